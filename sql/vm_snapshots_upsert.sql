-- Register a VM snapshot; a re-trained day replaces its row. Keyed on (vm, method, ds).
-- Parameters: :vm :method :ds :uri :sha256 :teacher_snapshot_id :teacher_trained_through_ds
--             :n_examples :train_loss :hyper_parameters
MERGE INTO $vm_snapshots AS t
USING (
  SELECT
    :vm AS vm,
    :method AS method,
    :ds AS ds,
    :uri AS uri,
    :sha256 AS sha256,
    CAST(:teacher_snapshot_id AS STRING) AS teacher_snapshot_id,
    CAST(:teacher_trained_through_ds AS STRING) AS teacher_trained_through_ds,
    CAST(:n_examples AS BIGINT) AS n_examples,
    CAST(:train_loss AS DOUBLE) AS train_loss,
    :hyper_parameters AS hyper_parameters
) AS s
ON t.vm = s.vm AND t.method = s.method AND t.ds = s.ds
WHEN MATCHED THEN UPDATE SET *
WHEN NOT MATCHED THEN INSERT *
