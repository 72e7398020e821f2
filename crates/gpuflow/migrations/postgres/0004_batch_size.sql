-- How many tasks the batch held that a worker task was sent in (1 without batching); NULL for
-- command stages and attempts that never reached a worker.
ALTER TABLE attempts ADD COLUMN IF NOT EXISTS batch_size BIGINT;
