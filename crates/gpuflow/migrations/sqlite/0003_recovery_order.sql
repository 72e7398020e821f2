-- Recovery reads unfinished jobs a page at a time in the order they are served (priority,
-- high first, then arrival), so the first dispatch after a restart need not wait for all.
CREATE INDEX jobs_unfinished_in_order ON jobs(-priority, seq) WHERE state IN ('queued', 'running');
