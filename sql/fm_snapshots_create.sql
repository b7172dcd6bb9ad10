-- The Snapshot Publishing DB (paper §3.2, DESIGN.md §2): one row per FM snapshot. A snapshot
-- exists for the DAS only through its row; the files are written and verified before it.
CREATE TABLE IF NOT EXISTS $fm_snapshots (
  snapshot_id STRING NOT NULL,
  trained_through_ds STRING NOT NULL,
  uri STRING NOT NULL,
  sha256 STRING NOT NULL,
  n_examples BIGINT,
  train_loss DOUBLE,
  holdout_ne DOUBLE,               -- blessing: NE on the day's holdout slice
  reference_snapshot_id STRING,    -- blessing: the snapshot it was compared with
  reference_ne DOUBLE,
  status STRING NOT NULL,          -- published | blessed | rejected
  created_at TIMESTAMP NOT NULL,
  collected_at TIMESTAMP           -- set when gc-snapshots deleted the files
) USING delta
