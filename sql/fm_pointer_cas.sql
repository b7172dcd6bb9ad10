-- Compare-and-set of the pointer: succeeds (1 affected row) only if the pointer still holds
-- :expected_snapshot_id ('' = no pointer yet). Delta's optimistic concurrency makes a racing
-- writer that read the same row fail its commit, so a lost update cannot happen.
-- Parameters: :name :expected_snapshot_id :snapshot_id :lease_expires_at :now
MERGE INTO $fm_pointer AS t
USING (SELECT :name AS name) AS s
ON t.name = s.name
WHEN MATCHED AND t.snapshot_id = :expected_snapshot_id THEN UPDATE SET
  snapshot_id = :snapshot_id,
  lease_expires_at = CAST(:lease_expires_at AS TIMESTAMP),
  updated_at = CAST(:now AS TIMESTAMP)
WHEN NOT MATCHED AND :expected_snapshot_id = '' THEN INSERT (name, snapshot_id, lease_expires_at, updated_at)
  VALUES (s.name, :snapshot_id, CAST(:lease_expires_at AS TIMESTAMP), CAST(:now AS TIMESTAMP))
