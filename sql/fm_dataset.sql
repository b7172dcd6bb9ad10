-- FM dataset of one day (DESIGN.md §2): one row per request_id, the union of every VM's view.
-- A feature name means the same thing in every VM, so the views of a request seen by several
-- VMs merge column by column; max() keeps the non-null value (views that both carry a feature
-- agree on it) and is deterministic. Features no view carries stay null.
-- Parameters: :ds; {vm_traffic} is the table's DataFrame. The $$placeholders are lists of
-- quoted column names from the VM registry.
SELECT
  request_id,
  min(event_ts) AS event_ts,
  max(user_id) AS user_id,
  max(ad_id) AS ad_id,
  $feature_columns,
  $label_columns,
  array_sort(collect_set(vm)) AS source_vms,
  ds
FROM {vm_traffic}
WHERE ds = :ds
GROUP BY ds, request_id
