-- How long VACUUM keeps the files of replaced versions. $hours is a validated integer from the
-- config: a table property takes a literal, not a parameter marker.
ALTER TABLE $table SET TBLPROPERTIES ('delta.deletedFileRetentionDuration' = 'interval $hours hours')
