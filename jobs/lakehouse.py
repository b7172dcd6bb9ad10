"""Shared Delta plumbing: table names, day partitions, idempotent writes, the sql/ files."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import time
import uuid
from dataclasses import dataclass
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
    from jobs import faults

    order = [c for c in partition_by if c != "ds"] + list(order)
    df = df.repartitionByRange(*order).sortWithinPartitions(*order)
    with faults.delta_write(table, cfg.table(table)):
        (
            df.write.format("delta")
            .mode("overwrite")
            .option("replaceWhere", partition_predicate(**where))
            .option("mergeSchema", "true")  # a VM or feature added to the registry adds columns
            .partitionBy(*partition_by)
            .save(cfg.table(table))
        )


def read_day(spark, cfg: ExfmConfig, table: str, ds: dt.date, version: int | None = None):
    """The rows of one day of a Delta table (partition pruned), at ``version`` (time travel) or the
    current one."""
    from pyspark.sql import functions as F

    reader = spark.read.format("delta")
    if version is not None:
        reader = reader.option("versionAsOf", version)
    return reader.load(cfg.table(table)).where(F.col("ds") == ds.isoformat())


def table_version(cfg: ExfmConfig, table: str) -> int | None:
    """Current Delta version of a table, or None if it does not exist yet.

    Read from the log's file names, not ``DESCRIBE HISTORY`` (a Spark job: ~0.5 s, and a gate asks
    seven times): a commit is ``<version>.json``, created atomically, and the newest commit (or
    the checkpoint that replaced it) always stays in the log.
    """
    stamp = table_stamp(cfg, table)
    return stamp[0] if stamp else None


def is_delta(uri: str) -> bool:
    """Whether a Delta table lives at ``uri``: its log holds a commit. Read from storage, because
    ``DeltaTable.isDeltaTable`` needs the Delta Connect server plugin on a Spark Connect session."""
    return bool(_log_entries(uri))


def table_stamp(cfg: ExfmConfig, table: str) -> tuple[int, int] | None:
    """(current version, mtime in ns of its log entry) of a table, or None if it does not exist.

    The mtime tells a table apart from one dropped and made again up to the same version, so a
    reader may keep what it read of a table for as long as the stamp stays the same.
    """
    entries = _log_entries(cfg.table(table))
    if not entries:
        return None
    version = max(v for v, _ in entries)
    return version, max(info.mtime_ns or 0 for v, info in entries if v == version)


def _log_entries(uri: str) -> list:
    """(version, pyarrow FileInfo) of each commit and checkpoint in the table's ``_delta_log``."""
    from pyarrow import fs as pafs

    fs, path = filesystem(uri.removeprefix("file:"))
    try:
        log_files = fs.get_file_info(pafs.FileSelector(f"{path}/_delta_log", allow_not_found=True))
    except NotADirectoryError:
        return []
    matches = ((_LOG_ENTRY.fullmatch(f.base_name), f) for f in log_files)
    return [(int(m[1]), f) for m, f in matches if m]


# A commit (<version>.json) or a checkpoint (<version>.checkpoint[.<part or uuid>].parquet|json);
# not the file system's hidden .crc copies.
_LOG_ENTRY = re.compile(r"(\d{20})\.(?:json|checkpoint(?:\..+)?\.(?:parquet|json))")
ARRIVAL = ("event_ts", "request_id")  # the order training reads a day in; request_id breaks ties
SCRATCH = "_scratch"  # Parquet that Spark writes for a Python reader (lakehouse_root/_scratch/<uuid>)
_DIRECT_UNSAFE = ("delta.enableDeletionVectors", "delta.columnMapping.mode")  # files alone would lie


@dataclass(frozen=True)
class DayFiles:
    """What reading one day of a table needs from Delta: its files, listed once.

    ``direct``: the day's files of the table's current version (``inputFiles()``,
    partition-pruned), in arrival order when listed ``ordered``; None when the files alone would
    be wrong (out of order, deletion vectors, column mapping) and Spark must read the day.
    ``schema``: the table's columns as Arrow types, so a process without Spark (a training rank)
    can read the files (``arrow_day(None, ...)``). ``version``: the table version they were listed
    at, which every read of the listing is pinned to: what a model trained on (its lineage).
    """

    direct: list[str] | None
    schema: object = None  # pyarrow.Schema
    version: int | None = None


def day_files(
    spark, cfg: ExfmConfig, table: str, ds: dt.date, *, vm: str | None = None, ordered: bool = True
):
    """List one day's files (one Delta metadata query) for ``arrow_day`` and ``day_values``."""
    version = table_version(cfg, table)
    if version is None:
        return DayFiles([])
    df = _day(spark, cfg, table, ds, vm, version)
    return DayFiles(_direct_files(spark, cfg, table, df, ordered), _arrow_schema(df.schema), version)


def _arrow_schema(schema):
    import pyarrow as pa
    from pyspark.sql.pandas.types import to_arrow_type

    return pa.schema([(f.name, to_arrow_type(f.dataType, timezone="UTC")) for f in schema.fields])


def _day(spark, cfg: ExfmConfig, table: str, ds: dt.date, vm: str | None, version: int | None = None):
    from pyspark.sql import functions as F

    df = read_day(spark, cfg, table, ds, version)
    return df if vm is None else df.where(F.col("vm") == vm)


def day_values(
    spark, cfg: ExfmConfig, table: str, ds: dt.date, column: str, *, vm: str | None, files: DayFiles
) -> set:
    """The distinct values of one column in one day: from the listed files when they can be
    read directly (pyarrow, one column, no Spark job), else one Spark query."""
    import pyarrow.compute as pc

    if files.direct is None:
        rows = _day(spark, cfg, table, ds, vm, files.version).select(column).distinct().collect()
        return {r[0] for r in rows}
    seen = set()
    for f in files.direct:
        reader = _parquet(f)
        if column in reader.schema_arrow.names:
            seen.update(pc.unique(reader.read(columns=[column]).column(0)).to_pylist())
        elif reader.metadata.num_rows:
            seen.add(None)  # files written before the column existed read it as null
    return seen


@contextlib.contextmanager
def arrow_day(
    spark,
    cfg: ExfmConfig,
    table: str,
    ds: dt.date,
    columns: list[str],
    *,
    vm: str | None = None,
    ordered: bool = True,
    batch_rows: int = 65_536,
    files: DayFiles | None = None,
    dictionary: tuple[str, ...] = (),
):
    """One day of a Delta table for a Python consumer, Arrow all the way: yields ``(rows, batches())``.

    The day's files of the table's current version (``day_files``, or ``files`` when the caller
    listed them already) are read with pyarrow, ``batch_rows`` at a time, so the consumer holds
    one batch and never a day, and no row is pickled or goes through a Spark job. ``ordered``:
    in arrival order (event_ts, request_id). The writers lay a day out that way
    (``replace_partition``), which a pass over the key columns verifies; any other layout is
    sorted by Spark first (``spark_to_arrow``), so the batches are the same whatever the file
    layout. ``rows`` (before any filtering by the consumer) comes from the files' footers. Every
    batch has the schema of ``columns`` (those the table has): a column missing from older files
    reads as nulls. The string columns named in ``dictionary`` come dictionary-encoded, as Parquet
    stores them, when read from the files (the encoder then hashes each distinct id once).
    """
    import pyarrow as pa

    if files is not None and files.schema is not None:  # listed already: no Spark needed to read
        df, table_schema = None, files.schema
    else:
        df = _day(spark, cfg, table, ds, vm)
        table_schema = _arrow_schema(df.schema)
    wanted = [c for c in dict.fromkeys(columns) if c in table_schema.names]  # the arrival keys only if asked
    direct = (files or DayFiles(_direct_files(spark, cfg, table, df, ordered))).direct
    if direct is None:
        if spark is None:
            raise ValueError(f"{table} ds={ds}: its files alone cannot be read in order, only Spark can")
        df = _day(spark, cfg, table, ds, vm, files.version if files else None) if df is None else df
        log.info(
            "%s ds=%s%s: files not in arrival order, Spark sorts the day",
            table,
            ds,
            f" vm={vm}" if vm else "",
        )
        out = df.orderBy(*ARRIVAL) if ordered else df  # a projection after the sort keeps its order
        with spark_to_arrow(out.select(*wanted), cfg, batch_rows=batch_rows) as day:
            yield day
        return
    as_dictionary = [c for c in wanted if c in dictionary and pa.types.is_string(table_schema.field(c).type)]
    schema = pa.schema(
        [
            table_schema.field(c).with_type(pa.dictionary(pa.int32(), pa.string()))
            if c in as_dictionary
            else table_schema.field(c)
            for c in wanted
        ]
    )
    readers = [_parquet(f, read_dictionary=as_dictionary) for f in direct]

    def batches():
        for reader in readers:
            have = [c for c in wanted if c in reader.schema_arrow.names]
            for rb in reader.iter_batches(batch_size=batch_rows, columns=have):
                arrays = [
                    rb.column(c) if c in have else pa.nulls(rb.num_rows, schema.field(c).type) for c in wanted
                ]
                yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    yield sum(r.metadata.num_rows for r in readers), batches()


def _parquet(uri: str, **options):
    import pyarrow.parquet as pq

    fs, path = filesystem(uri.removeprefix("file:"))
    return pq.ParquetFile(fs.open_input_file(path), **options)


def table_properties(spark, cfg: ExfmConfig, table: str) -> dict[str, str]:
    """A Delta table's properties (metadata only, no Spark job)."""
    return dict(spark.sql(f"SHOW TBLPROPERTIES {table_ref(cfg, table)}").collect())


def _direct_files(spark, cfg: ExfmConfig, table: str, df, ordered: bool) -> list[str] | None:
    """The day's files, in arrival order if ``ordered``; None when reading the files alone is wrong."""
    properties = table_properties(spark, cfg, table)
    if any(properties.get(k, "false") not in ("false", "none") for k in _DIRECT_UNSAFE):
        return None  # deletion vectors or column mapping: only Delta's reader applies them
    files = sorted(df.inputFiles())
    if not ordered:
        return files
    spans = []  # (first key, last key, file) of each non-empty file
    for f in files:
        span = _sorted_span(f)
        if span is False:
            return None
        if span is not None:
            spans.append((*span, f))
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:], strict=False)):
        return None  # files overlap in time: only a sort gives arrival order
    return [f for *_, f in spans]


def _sorted_span(uri: str):
    """(first, last) arrival key of a file sorted by it; None if it is empty, False if not sorted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    first = last = None
    for rb in _parquet(uri).iter_batches(batch_size=262_144, columns=list(ARRIVAL)):
        if not rb.num_rows:
            continue
        ts, rid = rb.column(0).cast(pa.int64()), rb.column(1)
        if last is not None and (ts[0].as_py(), rid[0].as_py()) < last:
            return False
        head, tail = slice(0, rb.num_rows - 1), slice(1, rb.num_rows)
        later = pc.greater(ts[tail], ts[head])
        tie = pc.and_(pc.equal(ts[tail], ts[head]), pc.greater_equal(rid[tail], rid[head]))
        if pc.all(pc.or_(later, tie)).as_py() is False:
            return False
        first = first or (ts[0].as_py(), rid[0].as_py())
        last = (ts[-1].as_py(), rid[-1].as_py())
    return None if first is None else (first, last)


@contextlib.contextmanager
def spark_to_arrow(df, cfg: ExfmConfig, *, order_by: tuple[str, ...] = (), batch_rows: int = 65_536):
    """A DataFrame's rows for a Python consumer, Arrow all the way: yields ``(rows, batches())``.

    Spark computes the DataFrame (sorted by ``order_by``: a range shuffle, any size) and writes
    it as Parquet under ``<lakehouse_root>/_scratch/<uuid>``; ``batches()`` reads those files back
    in Spark's partition order with pyarrow, ``batch_rows`` at a time, so the consumer holds one
    batch, never a day, and no row is ever pickled. The order comes from the sort, not from the
    table's file layout, so it is the same for tables written by replaceWhere or MERGE and on
    every re-run. ``rows`` comes from the files' footers (no extra Spark job). The scratch
    directory is deleted on exit, also on error.
    """
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    uri = f"{cfg.table(SCRATCH)}/{uuid.uuid4().hex}"
    fs, path = filesystem(uri)
    try:
        # Small row groups: pyarrow decodes one row group at a time, so they bound the reader's memory.
        (df.orderBy(*order_by) if order_by else df).write.option("parquet.block.size", str(8 << 20)).parquet(
            uri
        )
        # part-<partition>-<job>-c<file>.parquet: name order is partition order, i.e. sort order.
        files = sorted(
            info.path
            for info in fs.get_file_info(pafs.FileSelector(path))
            if info.base_name.startswith("part-") and info.base_name.endswith(".parquet")
        )
        readers = [pq.ParquetFile(fs.open_input_file(f)) for f in files]

        def batches():
            for reader in readers:
                yield from reader.iter_batches(batch_size=batch_rows)

        yield sum(r.metadata.num_rows for r in readers), batches()
    finally:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def filesystem(uri: str):
    """(pyarrow filesystem, path) of a local path or a URI (s3a:// is read as s3://)."""
    from pyarrow import fs

    if "://" not in uri:
        return fs.LocalFileSystem(), uri
    return fs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))


def tree_bytes(fs, path: str) -> int:
    """Bytes of the files under a directory of a pyarrow filesystem (0 when it is not one)."""
    from pyarrow import fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def delta_conflicts() -> tuple[type[Exception], ...]:
    """Delta's failed optimistic commits. Not one hierarchy: ConcurrentAppendException, for one,
    is no DeltaConcurrentModificationException in Python. Importing delta.exceptions (and, for a
    Spark Connect session, delta.connect.exceptions) is also what makes PySpark raise them instead
    of a bare Py4JJavaError or SparkConnectGrpcException, so call this before committing."""
    import delta.connect.exceptions  # noqa: F401 - registers the Spark Connect conversion
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
