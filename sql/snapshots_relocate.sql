-- A run copied from another (a study arm that starts from another arm's files, the fault matrix's
-- second world) points the recorded URIs of its snapshots at its own copies: every URI under
-- :old (the other run's snapshots root) moves to :new.
-- Parameters: :old, :new. $snapshots is the table (fm_snapshots or vm_snapshots).
UPDATE $snapshots
SET uri = concat(:new, substr(uri, char_length(:old) + 1))
WHERE startswith(uri, :old)
