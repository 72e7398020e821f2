-- Diagnosis findings: opened when a condition holds, closed when it clears.
CREATE TABLE findings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    summary     TEXT NOT NULL,
    evidence    TEXT NOT NULL,   -- JSON array of [label, value]
    cause       TEXT NOT NULL,
    fix         TEXT NOT NULL,
    opened_at   INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    closed_at   INTEGER
);
CREATE INDEX findings_open ON findings(closed_at) WHERE closed_at IS NULL;
CREATE INDEX findings_recent ON findings(opened_at);
