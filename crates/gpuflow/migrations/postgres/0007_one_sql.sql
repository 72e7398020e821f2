-- Recovery reads unfinished jobs a page at a time in the order they are served (priority,
-- high first, then arrival), as the embedded store does since its migration 3.
CREATE INDEX IF NOT EXISTS jobs_unfinished_in_order ON jobs ((-priority), seq) WHERE state IN ('queued', 'running');

-- `pending` waits for predecessors and `queued` is ready, on both backends. Jobs admitted
-- through `Store::insert_job` (not the shared queue) used to leave ready stages `pending`:
-- record them as queued now.
UPDATE stages SET state = 'queued'
WHERE state = 'pending'
  AND job_id IN (SELECT id FROM jobs WHERE state IN ('queued', 'running'))
  AND NOT EXISTS (
      SELECT 1 FROM json_array_elements_text(stages.deps::json) AS d(value)
      JOIN stages AS p ON p.job_id = stages.job_id AND p.idx = d.value::bigint
      WHERE p.state <> 'succeeded');
