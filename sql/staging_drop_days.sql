-- Drop published days from a staging copy (jobs/maintenance.py). Parameters: :days (array of ds)
DELETE FROM $staged
WHERE array_contains(:days, ds)
