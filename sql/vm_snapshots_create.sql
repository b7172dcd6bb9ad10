-- One row per VM snapshot (DESIGN.md §2): what evaluate and the report read instead of
-- listing snapshot directories.
CREATE TABLE IF NOT EXISTS $vm_snapshots (
  vm STRING NOT NULL,
  method STRING NOT NULL,
  ds STRING NOT NULL,                 -- trained through this day
  uri STRING NOT NULL,
  sha256 STRING NOT NULL,
  teacher_snapshot_id STRING,         -- the FM whose scores it learned from (NULL: cold start or `none`)
  teacher_trained_through_ds STRING,
  n_examples BIGINT,
  train_loss DOUBLE,
  hyper_parameters STRING             -- JSON: w, alpha, beta, lr, sizes
) USING delta
