"""Airflow's local-settings hook, imported by every Airflow process (./exfm puts this clone on
PYTHONPATH; a deployment puts the file on the scheduler's).

The LocalExecutor forks its workers from the scheduler and each task process from a worker, so
what the scheduler has imported a task starts with. Importing the libraries the tasks use here,
once, spares every task 3-8 s of CPU (GX alone takes ~3 s to import), which on a small day is
a large part of a task. Third-party libraries only: the project's own modules (jobs/) are imported
by each task, so an edit takes effect without restarting the scheduler.
"""

from __future__ import annotations

import importlib
import sys

__all__: list[str] = []  # Airflow copies every public name of this module into airflow.settings

PRELOAD = ("great_expectations", "torch", "pyspark.sql.connect.session", "pyarrow.parquet", "pandas")

if sys.argv[1:2] == ["scheduler"]:
    for _name in PRELOAD:
        importlib.import_module(_name)
