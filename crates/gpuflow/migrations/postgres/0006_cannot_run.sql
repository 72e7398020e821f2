-- Agents that cannot run a claimable stage, and why (its pipeline does not load there, or it
-- needs a pool or resource the agent lacks). A stage that every live agent has marked, and
-- that has waited past `cluster.unrunnable_after`, fails with these reasons.
CREATE TABLE cannot_run (
    job_id    TEXT NOT NULL,
    stage_idx BIGINT NOT NULL,
    agent_id  TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (job_id, stage_idx, agent_id)
);
