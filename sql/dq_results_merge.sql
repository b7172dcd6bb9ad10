-- Record one validation in dq_results, keyed on (ds, table, suite): a re-validation of the day
-- replaces its row. `t.ds = :ds` confines the MERGE to the day, so gates of different days
-- running in parallel do not conflict.
-- Parameters: :ds. $dq_results is the table, {dq_row} the one-row DataFrame.
MERGE INTO $dq_results AS t
USING {dq_row} AS s
ON t.ds = :ds AND t.ds = s.ds AND t.`table` = s.`table` AND t.suite = s.suite
WHEN MATCHED THEN UPDATE SET *
WHEN NOT MATCHED THEN INSERT *
