-- Findings name the engine that opened them, as in the PostgreSQL store, so both backends
-- share one statement text; the embedded engine is the empty name.
ALTER TABLE findings ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';

-- `pending` waits for predecessors and `queued` is ready, on both backends. The embedded
-- engine used to leave ready stages `pending` (readers worked out "queued"): record them as
-- queued now.
UPDATE stages SET state = 'queued'
WHERE state = 'pending'
  AND job_id IN (SELECT id FROM jobs WHERE state IN ('queued', 'running'))
  AND NOT EXISTS (
      SELECT 1 FROM json_each(stages.deps) AS d
      JOIN stages AS p ON p.job_id = stages.job_id AND p.idx = d.value
      WHERE p.state <> 'succeeded');
