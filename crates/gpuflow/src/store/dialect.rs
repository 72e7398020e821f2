//! What SQLite and PostgreSQL really disagree on, in one place. Every other statement is one
//! text in `sql.rs`, run by both (sqlx's SQLite driver binds `$N` as argument N, as
//! PostgreSQL does).

/// The fragments a backend puts where the two databases need different words.
#[derive(Debug)]
pub struct Dialect {
    /// How a transaction that writes begins. SQLite takes the write lock at once, so a
    /// second writer waits out `busy_timeout` instead of failing at its first write.
    pub begin_write: &'static str,
    /// `$1`, a JSON array of text, as rows with one column `value` (SQLite has no arrays).
    pub json_text_rows: &'static str,
    /// The unfinished jobs after the cursor `($1, $2) = (-priority, seq)`, as a `FROM ...
    /// WHERE` clause that seeks in `jobs_unfinished_in_order`. SQLite's planner seeks only
    /// when told the index and given the OR form (checked with EXPLAIN QUERY PLAN: it sorted
    /// every unfinished job for each page otherwise); PostgreSQL seeks with a row comparison.
    pub unfinished_after: &'static str,
    /// Taken inside the migration transaction so that engines starting together migrate one
    /// at a time (SQLite's `BEGIN IMMEDIATE` already serializes them).
    pub migration_lock: Option<&'static str>,
    /// The time now, in milliseconds since the epoch.
    pub now_ms: &'static str,
}

pub const SQLITE: Dialect = Dialect {
    begin_write: "BEGIN IMMEDIATE",
    json_text_rows: "SELECT value FROM json_each($1)",
    unfinished_after: "FROM jobs INDEXED BY jobs_unfinished_in_order WHERE state IN ('queued', 'running') \
                       AND (-priority > $1 OR (-priority = $1 AND seq > $2))",
    migration_lock: None,
    now_ms: "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
};

pub const POSTGRES: Dialect = Dialect {
    begin_write: "BEGIN",
    json_text_rows: "SELECT value FROM json_array_elements_text($1::json)",
    unfinished_after: "FROM jobs WHERE state IN ('queued', 'running') AND (-priority, seq) > ($1, $2)",
    migration_lock: Some("SELECT pg_advisory_xact_lock(70707070)"),
    now_ms: "gpuflow_now_ms()",
};
