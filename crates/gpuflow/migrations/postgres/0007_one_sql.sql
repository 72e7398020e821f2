-- Recovery reads unfinished jobs a page at a time in the order they are served (priority,
-- high first, then arrival), as the embedded store does since its migration 3.
CREATE INDEX IF NOT EXISTS jobs_unfinished_in_order ON jobs ((-priority), seq) WHERE state IN ('queued', 'running');
