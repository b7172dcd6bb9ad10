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
    """Atomically replace exactly the rows of ``where`` (one Delta commit); other days untouched."""
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
