-- Delete the files no version inside the retention needs; Delta's safety check (at least 7 days)
-- stays on. $hours is a validated integer from the config: VACUUM takes no parameter marker.
VACUUM $table RETAIN $hours HOURS $dry_run
