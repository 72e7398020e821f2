-- Findings name the engine that opened them, as in the PostgreSQL store, so both backends
-- share one statement text; the embedded engine is the empty name.
ALTER TABLE findings ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
