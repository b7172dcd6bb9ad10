-- Compact a table's small files (jobs/maintenance.py: the bookkeeping tables only).
OPTIMIZE $table
