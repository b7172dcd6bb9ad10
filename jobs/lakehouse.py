"""Shared Delta plumbing: table names, day partitions, idempotent writes, the sql/ files."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from string import Template

from jobs.config import ExfmConfig

SQL_DIR = Path(__file__).resolve().parents[1] / "sql"
VM_TRAFFIC = "vm_traffic"
FM_DATASET = "fm_dataset"
VM_TRAINING = "vm_training"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote(identifier: str) -> str:
    """A column name for SQL text. Only identifiers are ever rendered; values are parameters."""
    if not _IDENTIFIER.match(identifier):
        raise ValueError(f"not a plain SQL identifier: {identifier!r}")
    return f"`{identifier}`"


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


def replace_partition(df, cfg: ExfmConfig, table: str, partition_by: list[str], **where) -> None:
    """Atomically replace exactly the rows of ``where`` (one Delta commit); other days untouched.

    Rows are range-partitioned and sorted by arrival (event_ts, request_id) inside each table
    partition, so every file holds one contiguous, sorted slice of time: a reader streams a
    day in arrival order by reading its files one after the other (see ``day_files``).
    """
    order = [c for c in partition_by if c != "ds"] + ["event_ts", "request_id"]
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


def day_files(spark, cfg: ExfmConfig, table: str, ds: dt.date, vm: str | None = None) -> list[str]:
    """The files of the table's current version for one day (and VM), in arrival order.

    Comes from the Delta snapshot (``inputFiles``), never a directory listing, which would
    still hold files that an earlier replaceWhere removed.
    """
    from pyspark.sql import functions as F

    df = read_day(spark, cfg, table, ds)
    if vm is not None:
        df = df.where(F.col("vm") == vm)
    spans = sorted(_event_ts_span(uri) + (uri,) for uri in df.inputFiles())
    for (_, prev_max, prev), (next_min, _, nxt) in zip(spans, spans[1:], strict=False):
        if prev_max > next_min:
            raise ValueError(
                f"{table} ds={ds}: files {prev} and {nxt} overlap in event_ts, so the day cannot be "
                "streamed in arrival order; rewrite the day with its exfm job"
            )
    return [uri for *_, uri in spans]


def iter_record_batches(uris: list[str], columns: list[str], batch_size: int):
    """Arrow record batches of the given files, one after the other; only one batch in memory."""
    import pyarrow.parquet as pq

    for uri in uris:
        fs, path = _filesystem(uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            present = [c for c in columns if c in parquet.schema_arrow.names]
            yield from parquet.iter_batches(batch_size=batch_size, columns=present)


def _filesystem(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))


def _event_ts_span(uri: str) -> tuple:
    """(min, max) event_ts of a parquet file from its footer statistics."""
    import pyarrow.parquet as pq

    fs, path = _filesystem(uri)
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    col = meta.schema.to_arrow_schema().get_field_index("event_ts")
    stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
    if not stats or any(s is None or not s.has_min_max for s in stats):
        raise ValueError(f"{uri} has no event_ts statistics; rewrite it with this version of exfm")
    return min(s.min for s in stats), max(s.max for s in stats)
