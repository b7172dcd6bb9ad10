-- The latest lease every snapshot ever held, from the pointer's change data feed: a reader
-- that resolved a snapshot may use it until then, even after the pointer moved on.
SELECT snapshot_id, max(lease_expires_at) AS lease_expires_at
FROM table_changes_by_path(:fm_pointer, 0)
GROUP BY snapshot_id
