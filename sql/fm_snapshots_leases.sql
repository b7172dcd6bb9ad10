-- The latest lease every snapshot held, from the pointer's change data feed: a reader that
-- resolved a snapshot may use it until then, even after the pointer moved on. From :start_version,
-- the first commit inside the VACUUM retention (older change files may be gone; leases granted
-- before it expired long ago, since das.lease_hours <= maintenance.retention_hours).
SELECT snapshot_id, max(lease_expires_at) AS lease_expires_at
FROM table_changes_by_path(:fm_pointer, :start_version)
GROUP BY snapshot_id
