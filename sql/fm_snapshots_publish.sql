-- Register one FM snapshot. One row per trained_through_ds: publishing the same files again
-- matches with the same sha256 and changes nothing; a retrained day (new sha256) replaces its
-- row, because its old files were overwritten.
-- Parameters: :snapshot_id :trained_through_ds :uri :sha256 :n_examples :train_loss
--             :holdout_ne :reference_snapshot_id :reference_ne :status :created_at
MERGE INTO $fm_snapshots AS t
USING (
  SELECT
    :snapshot_id AS snapshot_id,
    :trained_through_ds AS trained_through_ds,
    :uri AS uri,
    :sha256 AS sha256,
    CAST(:n_examples AS BIGINT) AS n_examples,
    CAST(:train_loss AS DOUBLE) AS train_loss,
    CAST(:holdout_ne AS DOUBLE) AS holdout_ne,
    CAST(:reference_snapshot_id AS STRING) AS reference_snapshot_id,
    CAST(:reference_ne AS DOUBLE) AS reference_ne,
    :status AS status,
    CAST(:created_at AS TIMESTAMP) AS created_at,
    CAST(NULL AS TIMESTAMP) AS collected_at
) AS s
ON t.trained_through_ds = s.trained_through_ds
WHEN MATCHED AND t.sha256 <> s.sha256 THEN UPDATE SET *
WHEN NOT MATCHED THEN INSERT *
