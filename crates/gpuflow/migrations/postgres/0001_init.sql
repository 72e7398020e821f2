-- The shared queue: the same tables as the embedded SQLite store, plus the agents that share
-- it and the leases they hold. Times are milliseconds since the epoch. Lease expiry and retry
-- delays are read against the database's clock, so agents' clocks need not agree.
CREATE FUNCTION gpuflow_now_ms() RETURNS BIGINT LANGUAGE SQL VOLATILE AS
$$ SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT $$;

CREATE TABLE config_snapshots (
    hash        TEXT PRIMARY KEY,
    text        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE jobs (
    seq             BIGSERIAL PRIMARY KEY,      -- arrival order
    id              TEXT NOT NULL UNIQUE,
    pipeline        TEXT NOT NULL,
    input           TEXT NOT NULL,
    priority        BIGINT NOT NULL,
    state           TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    config_hash     TEXT NOT NULL REFERENCES config_snapshots(hash),
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    error           TEXT,
    output          TEXT,
    -- Set when the job is bound to fail or be cancelled; it is final once no stage runs.
    ending          TEXT
);
CREATE INDEX jobs_by_state ON jobs(state, seq);
CREATE INDEX jobs_by_pipeline ON jobs(pipeline, seq);

CREATE TABLE stages (
    job_id        TEXT NOT NULL REFERENCES jobs(id),
    idx           BIGINT NOT NULL,
    name          TEXT NOT NULL,
    deps          TEXT NOT NULL,          -- JSON array of predecessor positions
    state         TEXT NOT NULL,          -- pending, queued, backoff, running, succeeded, failed, cancelled
    attempts      BIGINT NOT NULL DEFAULT 0,
    failures      BIGINT NOT NULL DEFAULT 0,
    interruptions BIGINT NOT NULL DEFAULT 0,
    not_before    BIGINT,
    started_at    BIGINT,
    finished_at   BIGINT,
    exit_code     BIGINT,
    error         TEXT,
    output        TEXT,
    -- The job's priority and arrival, copied here so claims walk one index in claim order.
    priority      BIGINT NOT NULL DEFAULT 0,
    job_seq       BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
-- What agents claim from, in claim order: small, because claimable stages leave it as soon as
-- they run, and a claim reads only its first rows instead of sorting every queued stage.
CREATE INDEX stages_claimable ON stages(priority DESC, job_seq, idx) WHERE state IN ('queued', 'backoff');

CREATE TABLE attempts (
    job_id      TEXT NOT NULL,
    stage_idx   BIGINT NOT NULL,
    attempt     BIGINT NOT NULL,
    state       TEXT NOT NULL,            -- running, succeeded, failed, timed_out, cancelled, interrupted
    grant_json  TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    finished_at BIGINT,
    exit_code   BIGINT,
    signal      BIGINT,
    error       TEXT,
    agent_id    TEXT,
    token       BIGINT,
    PRIMARY KEY (job_id, stage_idx, attempt),
    FOREIGN KEY (job_id, stage_idx) REFERENCES stages(job_id, idx)
);
CREATE INDEX attempts_running ON attempts(state) WHERE state = 'running';

CREATE TABLE findings (
    id          BIGSERIAL PRIMARY KEY,
    agent_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    summary     TEXT NOT NULL,
    evidence    TEXT NOT NULL,
    cause       TEXT NOT NULL,
    fix         TEXT NOT NULL,
    opened_at   BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    closed_at   BIGINT
);
CREATE INDEX findings_open ON findings(closed_at) WHERE closed_at IS NULL;

-- One row per agent process (a restart is a new row with the same name).
CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    host          TEXT NOT NULL,
    pid           BIGINT NOT NULL,
    api           TEXT NOT NULL,
    resources     TEXT NOT NULL,         -- JSON: capacity and usage, refreshed with each heartbeat
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    state         TEXT NOT NULL          -- running, stopped, replaced
);
CREATE INDEX agents_by_name ON agents(name);

-- Fencing tokens only grow: a token names one claim of one attempt, forever.
CREATE SEQUENCE fencing_tokens;

-- A claimed attempt. Every write about the attempt deletes or checks its row by token, so an
-- agent whose lease expired (and was re-queued elsewhere) cannot write any more.
CREATE TABLE leases (
    token       BIGINT PRIMARY KEY,
    job_id      TEXT NOT NULL,
    stage_idx   BIGINT NOT NULL,
    attempt     BIGINT NOT NULL,
    agent_id    TEXT NOT NULL REFERENCES agents(id),
    granted_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    UNIQUE (job_id, stage_idx)
);
CREATE INDEX leases_by_agent ON leases(agent_id);
CREATE INDEX leases_by_expiry ON leases(expires_at);
