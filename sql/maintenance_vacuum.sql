-- Delete the files no version inside the table's delta.deletedFileRetentionDuration needs (Delta 4
-- takes the retention from the table, not from a RETAIN clause); its safety check stays on.
VACUUM $table $dry_run
