-- Mark snapshots whose files gc-snapshots deletes (before deleting them, so none resolves).
-- Parameters: :ids (array of snapshot_id), :now
UPDATE $fm_snapshots
SET collected_at = CAST(:now AS TIMESTAMP)
WHERE array_contains(:ids, snapshot_id) AND collected_at IS NULL
