-- The job a job was submitted to retry (`gpuflow retry`, `POST /v1/jobs/{id}/retry`); NULL for
-- ordinary submissions. No foreign key: retention may remove the earlier job first.
ALTER TABLE jobs ADD COLUMN retry_of TEXT;
CREATE INDEX jobs_by_retry_of ON jobs(retry_of) WHERE retry_of IS NOT NULL;
-- The short id the dashboard and the CLI show is an id's last 8 hex digits (the start of a
-- UUIDv7 is its timestamp, shared by every job of the same minute).
CREATE INDEX IF NOT EXISTS jobs_by_short_id ON jobs(substr(id, 29));
