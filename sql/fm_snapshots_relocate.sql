-- A study run that starts from a copy of another run's FM snapshots points their recorded
-- URIs at its own copies: every URI under :old (the other run's snapshots root) moves to :new.
-- Parameters: :old, :new. $fm_snapshots is the table.
UPDATE $fm_snapshots
SET uri = concat(:new, substr(uri, char_length(:old) + 1))
WHERE startswith(uri, :old)
