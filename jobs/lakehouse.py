"""Shared Delta plumbing: table names, day partitions, idempotent writes, the sql/ files."""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template

from jobs.config import ExfmConfig

log = logging.getLogger(__name__)
SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
VM_TRAFFIC = "vm_traffic"
FM_DATASET = "fm_dataset"
VM_TRAINING = "vm_training"
FM_SNAPSHOTS = "fm_snapshots"
FM_POINTER = "fm_pointer"
VM_SNAPSHOTS = "vm_snapshots"
VM_EVAL = "vm_eval"
DQ_RESULTS = "dq_results"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(identifier: str) -> str:
    """A column name for SQL text. Only identifiers are ever rendered; values are parameters."""
    if not _IDENTIFIER.match(identifier):
        raise ValueError(f"not a plain SQL identifier: {identifier!r}")
    return f"`{identifier}`"


def table_ref(cfg: ExfmConfig, table: str) -> str:
    """A Delta table by path, for SQL text: delta.`<path>` (a backtick in the path is doubled)."""
    return "delta.`" + cfg.table(table).replace("`", "``") + "`"


def render_sql(name: str, **identifier_lists: str) -> str:
    """The statement in sql/<name>.sql with its $placeholders filled by pre-quoted identifier lists.

    Values never go through here: they are bound as named parameters (:ds) by spark.sql(args=...).
    """
    return Template((SQL_DIR / f"{name}.sql").read_text()).substitute(identifier_lists)


def partition_predicate(**values: dt.date | str) -> str:
    """``ds = '2026-01-01' AND vm = 'feed'`` for Delta's replaceWhere, which only takes SQL text.

    Safe to build as text because every value is a real date or a validated identifier.
    """
    parts = []
    for column, value in values.items():
        if isinstance(value, dt.date):
            value = value.isoformat()
        elif not _IDENTIFIER.match(value):
            raise ValueError(f"partition value for {column} is not an identifier: {value!r}")
        parts.append(f"{quote(column)} = '{value}'")
    return " AND ".join(parts)


def replace_partition(
    df,
    cfg: ExfmConfig,
    table: str,
    partition_by: list[str],
    order: tuple[str, ...] = ("event_ts", "request_id"),
    **where,
) -> None:
    """Atomically replace exactly the rows of ``where`` (one Delta commit); other days untouched.

    Rows are range-partitioned and sorted by ``order`` (arrival, for traffic) inside each table
    partition, so every file holds one contiguous slice of time (good for data skipping).
    """
    order = [c for c in partition_by if c != "ds"] + list(order)
    df = df.repartitionByRange(*order).sortWithinPartitions(*order)
    (
        df.write.format("delta")
        .mode("overwrite")
        .option("replaceWhere", partition_predicate(**where))
        .option("mergeSchema", "true")  # a VM or feature added to the registry adds columns
        .partitionBy(*partition_by)
        .save(cfg.table(table))
    )


def read_day(spark, cfg: ExfmConfig, table: str, ds: dt.date):
    """The rows of one day of a Delta table (partition pruned)."""
    from pyspark.sql import functions as F

    return spark.read.format("delta").load(cfg.table(table)).where(F.col("ds") == ds.isoformat())


def table_version(spark, cfg: ExfmConfig, table: str) -> int | None:
    """Current Delta version of a table, or None if it does not exist yet."""
    from delta.tables import DeltaTable

    path = cfg.table(table)
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    return DeltaTable.forPath(spark, path).history(1).first()["version"]


def stream_ordered(df, columns: list[str], batch_rows: int = 8192) -> Iterator:
    """The rows of a DataFrame in arrival order (event_ts, request_id), as Arrow record batches.

    Spark sorts (a range shuffle, any size) and hands the driver one partition at a time as
    Arrow IPC blobs of at most ``batch_rows`` rows, so the consumer never holds a whole day.
    The order comes from the sort, not from the file layout, so it is the same for tables
    written by replaceWhere or by MERGE, and on every re-run (request_id breaks ties).
    """
    import pyarrow as pa

    def to_ipc(batches):
        for rb in batches:
            for start in range(0, rb.num_rows, batch_rows):
                sink = pa.BufferOutputStream()
                with pa.ipc.new_stream(sink, rb.schema) as writer:
                    writer.write_batch(rb.slice(start, batch_rows))
                yield pa.RecordBatch.from_pydict({"ipc": [sink.getvalue().to_pybytes()]})

    ordered = df.orderBy("event_ts", "request_id").select(*[c for c in columns if c in df.columns])
    ordered = ordered.mapInArrow(to_ipc, "ipc binary")
    for row in ordered.toLocalIterator(prefetchPartitions=True):
        yield from pa.ipc.open_stream(row.ipc)


def delta_conflicts() -> tuple[type[Exception], ...]:
    """Delta's failed optimistic commits. Not one hierarchy: ConcurrentAppendException, for one,
    is no DeltaConcurrentModificationException in Python. Importing delta.exceptions is also what
    makes PySpark raise them instead of a bare Py4JJavaError, so call this before committing."""
    from delta import exceptions

    return tuple(getattr(exceptions, name) for name in exceptions.__all__)


def retry_on_conflict(commit, *, what: str, attempts: int = 5):
    """Run an idempotent Delta commit again when a concurrent writer won the optimistic race.

    Parallel tasks (the mapped train_vm, the gates of one day) commit to the same small
    table; Delta makes the loser fail instead of losing an update, and re-running an idempotent
    MERGE after the winner's commit gives the same result as running it alone.
    """
    conflicts = delta_conflicts()  # before the commit: importing them installs their conversion
    for attempt in range(attempts):
        try:
            return commit()
        except conflicts as e:
            if attempt == attempts - 1:
                raise
            log.info("%s: lost a commit race (%s), retrying", what, type(e).__name__)
            time.sleep(0.5 * (attempt + 1))
