-- Each distinct pipeline file a job was accepted under, so recovery runs the definition the
-- job was accepted with, even if the file changed since.
CREATE TABLE config_snapshots (
    hash        TEXT PRIMARY KEY,
    text        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE jobs (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    id              TEXT NOT NULL UNIQUE,
    pipeline        TEXT NOT NULL,
    input           TEXT NOT NULL,
    priority        INTEGER NOT NULL,
    state           TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    config_hash     TEXT NOT NULL REFERENCES config_snapshots(hash),
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    error           TEXT,
    output          TEXT
);
CREATE INDEX jobs_by_state ON jobs(state, seq);
CREATE INDEX jobs_by_pipeline ON jobs(pipeline, seq);

CREATE TABLE stages (
    job_id        TEXT NOT NULL REFERENCES jobs(id),
    idx           INTEGER NOT NULL,
    name          TEXT NOT NULL,
    deps          TEXT NOT NULL,          -- JSON array of predecessor positions
    state         TEXT NOT NULL,          -- pending, backoff, running, succeeded, failed, cancelled
    attempts      INTEGER NOT NULL DEFAULT 0,
    failures      INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    not_before    INTEGER,
    started_at    INTEGER,
    finished_at   INTEGER,
    exit_code     INTEGER,
    error         TEXT,
    output        TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;

-- An attempt in state 'running' is a held lease; grant_json says what it holds.
CREATE TABLE attempts (
    job_id      TEXT NOT NULL,
    stage_idx   INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    state       TEXT NOT NULL,            -- running, succeeded, failed, timed_out, cancelled, interrupted
    grant_json  TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    exit_code   INTEGER,
    signal      INTEGER,
    error       TEXT,
    PRIMARY KEY (job_id, stage_idx, attempt),
    FOREIGN KEY (job_id, stage_idx) REFERENCES stages(job_id, idx)
) WITHOUT ROWID;
CREATE INDEX attempts_running ON attempts(state) WHERE state = 'running';
