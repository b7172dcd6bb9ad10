-- The latest-snapshot pointer (the paper's Zeus record): one row per pointer name. The change
-- data feed keeps every lease a snapshot ever held, which is what gc-snapshots must respect.
CREATE TABLE IF NOT EXISTS $fm_pointer (
  name STRING NOT NULL,
  snapshot_id STRING NOT NULL,
  lease_expires_at TIMESTAMP NOT NULL,
  updated_at TIMESTAMP NOT NULL
) USING delta
TBLPROPERTIES (delta.enableChangeDataFeed = true)
