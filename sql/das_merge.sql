-- Publish the DAS output (paper §3.2), once the gate passed (jobs/quality.py): each VM row of
-- day :ds with the FM's teacher score, keyed on (ds, vm, request_id). Re-running replaces the
-- day's rows. Rows of the day that are no longer staged (a re-ingest dropped them from
-- vm_traffic) come in the source as tombstones (teacher_snapshot_id NULL) and are deleted.
-- Tombstones instead of WHEN NOT MATCHED BY SOURCE: that clause makes Delta read the whole
-- table (delta-io/delta#2170), and then writers of other days conflict. With `t.ds = :ds` in
-- the condition this MERGE reads and writes only day :ds.
-- Parameters: :ds. $vm_training is the table, {das_source} the staged rows plus tombstones.
MERGE WITH SCHEMA EVOLUTION INTO $vm_training AS t
USING {das_source} AS s
ON t.ds = :ds AND t.ds = s.ds AND t.vm = s.vm AND t.request_id = s.request_id
WHEN MATCHED AND s.teacher_snapshot_id IS NULL THEN DELETE
WHEN MATCHED THEN UPDATE SET *
WHEN NOT MATCHED AND s.teacher_snapshot_id IS NOT NULL THEN INSERT *
