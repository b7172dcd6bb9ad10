"""ingest: landing files of day ds -> Delta ``vm_traffic`` partitioned by (ds, vm).

Contract (README "Input contract"): ``landing/ds=YYYY-MM-DD/vm=<name>/*.parquet`` (or *.csv
with a header) holding request_id, event_ts, user_id, ad_id, the VM's declared features and
its label. Every file is checked before anything is written (readable, not empty, contract
columns, types, timestamps, labels, finite dense values); the day of every VM is then staged in
one Delta commit (replaceWhere ds on ``_staging/vm_traffic``), and the gate
(``quality.run("vm_traffic", ...)``) validates and publishes it. A re-run replaces the day; a
failure changes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import defaultdict

from jobs import quality
from jobs.config import CONTRACT_COLUMNS, DataError, ExfmConfig, parse_ds
from jobs.lakehouse import VM_TRAFFIC, filesystem, quote, table_version

FORMATS = ("parquet", "csv")
MAX_REPORTED = 10  # problems listed in one error message


class ContractError(DataError):
    """Landing data breaks the input contract; the message names the file, column and rule."""


def contract_types(cfg: ExfmConfig) -> dict[str, str]:
    """Column -> Spark SQL type of vm_traffic (without the ds/vm partition columns)."""
    types = {"request_id": "string", "event_ts": "timestamp", "user_id": "string", "ad_id": "string"}
    types |= {c: "string" for c in cfg.categorical_features}
    types |= {c: "double" for c in cfg.dense_features}
    types |= {c: "int" for c in cfg.labels}
    return types


def run(ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    day = parse_ds(ds)
    files = _landing_files(cfg, day)
    raw = _read_and_cast(spark, cfg, day, files)
    stats = _check_contract(raw, cfg, files)
    conflicts = _check_conflicting_labels(raw, cfg)
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    # Duplicated log lines: keep one row per (vm, request_id), deterministically: the earliest,
    # then by a hash of the whole line, so a tie of conflicting labels favours neither label.
    columns = list(contract_types(cfg))
    first = Window.partitionBy("vm", "request_id").orderBy("event_ts", F.xxhash64(*columns))
    deduped = (
        raw.withColumn("_rank", F.row_number().over(first)).where("_rank = 1").select(*columns, "ds", "vm")
    )
    quality.stage(deduped, cfg, VM_TRAFFIC, day)

    written = {
        r["vm"]: (r["rows"], r["clicks"])
        for r in quality.staged_day(spark, cfg, VM_TRAFFIC, day)
        .groupBy("vm")
        .agg(F.count("*").alias("rows"), F.sum(F.coalesce(*[F.col(c) for c in cfg.labels])).alias("clicks"))
        .collect()
    }
    return {
        "ds": day.isoformat(),
        "rows": {vm: written.get(vm, (0, 0))[0] for vm in stats},
        "duplicates_dropped": {vm: stats[vm] - written.get(vm, (0, 0))[0] for vm in stats},
        "conflicting_labels": conflicts,
        "ctr": {vm: (c or 0) / n for vm, (n, c) in written.items() if n},
        "staged_version": table_version(cfg, quality.staging_table(VM_TRAFFIC)),
    }


def _landing_files(cfg: ExfmConfig, day: dt.date) -> dict[str, list[tuple[str, str]]]:
    """VM name -> [(path, format)] of the day's landing files, listed from storage.

    Listed with pyarrow's filesystems (a local path, s3a:// too) rather than a Spark reader,
    which silently skips 0-byte files (an empty export must stop the run, not vanish), and
    without the driver's JVM, which a Spark Connect client does not have.
    """
    from pyarrow import fs as pafs

    day_dir = f"{cfg.landing}/ds={day.isoformat()}"
    fs, root = filesystem(day_dir)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        raise ContractError(f"no landing data for ds={day}: {day_dir} does not exist")
    listing = [
        (f"{day_dir}/{f.path[len(root.rstrip('/')) + 1 :]}", f.size)  # the configured scheme, for Spark
        for f in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if f.type == pafs.FileType.File
    ]
    files: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, length in listing:
        rel = path.split(f"/ds={day.isoformat()}/", 1)[-1]
        if "/" not in rel or not rel.startswith("vm="):
            raise ContractError(f"landing file {path} is not under ds={day}/vm=<name>/")
        vm = rel.split("/", 1)[0].removeprefix("vm=")
        suffix = path.rsplit(".", 1)[-1].lower()
        if suffix in FORMATS:
            if length == 0:
                raise ContractError(f"landing file {path} is empty (0 bytes)")
            files[vm].append((path, suffix))
        elif not rel.rsplit("/", 1)[-1].startswith(("_", ".")):  # _SUCCESS, .crc, ...
            raise ContractError(f"landing file {path}: unsupported format (use .parquet or .csv)")
    registry = [v.name for v in cfg.vms]
    unknown = sorted(set(files) - set(registry))
    missing = [vm for vm in registry if vm not in files]
    if unknown:
        raise ContractError(f"landing {day_dir} has VMs {unknown} that are not in the registry {registry}")
    if missing:
        raise ContractError(f"no landing files for VMs {missing} in {day_dir} (want vm=<name>/*.parquet|csv)")
    return dict(files)


def _read_and_cast(spark, cfg: ExfmConfig, day: dt.date, files: dict[str, list[tuple[str, str]]]):
    """One DataFrame of every VM's rows, cast to the contract with try_cast (bad values -> null).

    Keeps the raw value of each column as ``_raw_<col>`` so the contract check can tell a null
    from a value that failed to cast, and ``_file`` so errors can name the file.
    """
    from pyspark.sql import functions as F

    types = contract_types(cfg)
    frames, problems = [], []
    for vm in cfg.vms:
        needed = [*CONTRACT_COLUMNS, *vm.features, vm.label]
        by_schema: dict[tuple, list[str]] = defaultdict(list)
        for path, fmt in files[vm.name]:
            try:
                names, types_key, nanos = _schema(spark, path, fmt)
            except ContractError as e:
                problems.append(str(e))  # every unreadable file of the day, not only the first
                continue
            missing = [c for c in needed if c not in names]
            if missing:  # listed with the others, not read
                problems.append(
                    f"landing file {path} (VM {vm.name}) is missing contract column(s) {missing}; "
                    f"it has {names}"
                )
                continue
            by_schema[(fmt, types_key, nanos)].append(path)
        if problems:
            continue  # the day fails below; read nothing more
        # Files with one schema are read together; different schemas are cast then unioned.
        for (fmt, _, nanos), paths in by_schema.items():
            df = _reader(spark, fmt).load(paths).withColumn("_file", F.col("_metadata.file_path"))
            cols = [F.col("_file")]
            for col in needed:
                if col in nanos:  # int64 nanoseconds since the epoch (UTC): microseconds, truncated
                    cast = F.expr(f"timestamp_micros(div({quote(col)}, 1000))")
                else:
                    cast = F.expr(f"try_cast({quote(col)} AS {types[col]})")
                cols.append(cast.alias(col))
                cols.append(F.col(col).cast("string").alias(f"_raw_{col}"))
            frames.append(df.select(*cols).withColumn("vm", F.lit(vm.name)))
    if problems:
        raise ContractError(_listed(problems, "landing file(s) cannot be ingested"))
    out = frames[0]
    for frame in frames[1:]:
        out = out.unionByName(frame, allowMissingColumns=True)
    # Columns no VM declares for a row stay null, typed per the contract.
    for col, typ in types.items():
        if col not in out.columns:
            out = out.withColumn(col, F.lit(None).cast(typ))
    return out.withColumn("ds", F.lit(day.isoformat()))


def _schema(spark, path: str, fmt: str) -> tuple[list[str], str, frozenset[str]]:
    """(column names, the schema as text, timestamp columns in nanoseconds) of a landing file, or
    a ContractError that says in words why it cannot be read (not parquet, truncated, no header).
    Files of one schema text are read together (Spark reads a column with one type per read)."""
    if fmt == "parquet":  # the footer only, with pyarrow: no Spark job per file
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, local = filesystem(path)
        try:
            with fs.open_input_file(local) as f:
                schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            why = (
                "it is not a parquet file, or it was cut short (no parquet footer at its end)"
                if "magic bytes" in str(e)
                else f"its parquet metadata is corrupt, e.g. a truncated file ({_first_line(e)})"
            )
            raise ContractError(f"landing file {path} cannot be read: {why}") from None
        nanos = frozenset(f.name for f in schema if pa.types.is_timestamp(f.type) and f.type.unit == "ns")
        return schema.names, str(schema), nanos
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException

    try:
        schema = _reader(spark, fmt).load(path).schema
    except (PySparkException, Py4JJavaError) as e:
        raise ContractError(f"landing file {path} cannot be read as {fmt}: {_first_line(e)}") from None
    if not schema.fields:  # a CSV without a header line
        raise ContractError(f"landing file {path} has no columns (empty {fmt} file)")
    return schema.fieldNames(), schema.json(), frozenset()


def _listed(problems: list[str], what: str) -> str:
    """One message for every problem of the day (the first MAX_REPORTED of them)."""
    more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
    shown = "\n  ".join(problems[:MAX_REPORTED])
    return f"{len(problems)} {what}; vm_traffic was not changed:\n  {shown}{more}"


def _local(path: str) -> str:
    """A listed path and Spark's ``_metadata.file_path`` of it (file:/p, file:///p) compare equal."""
    return re.sub(r"^file:(//)?(?=/)", "", path)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _reader(spark, fmt: str):
    reader = spark.read.format(fmt)
    if fmt == "csv":  # read every CSV column as text; the contract cast decides its type
        reader = reader.option("header", "true").option("inferSchema", "false")
    return reader


def _check_contract(raw, cfg: ExfmConfig, files: dict[str, list[tuple[str, str]]]) -> dict[str, int]:
    """One aggregate pass over the day: rows per VM, or a ContractError naming file, column, rule."""
    from py4j.protocol import Py4JJavaError
    from pyspark.errors import PySparkException
    from pyspark.sql import functions as F

    types = contract_types(cfg)
    rules = []  # (column, rule text, condition that marks a bad row)
    for col in types:
        raw_col, cast = F.col(f"_raw_{col}"), F.col(col)
        rules.append((col, f"value cannot be cast to {types[col]}", raw_col.isNotNull() & cast.isNull()))
        if types[col] == "int":  # try_cast truncates 0.7 to 0: a label must be a whole number
            as_double = F.expr(f"try_cast({quote('_raw_' + col)} AS double)")  # text: the cast rule's
            rules.append((col, "value is not an integer", as_double != cast.cast("double")))
    for col in CONTRACT_COLUMNS:
        rules.append((col, "must not be null", F.col(f"_raw_{col}").isNull()))
    for vm in cfg.vms:
        is_vm = F.col("vm") == vm.name
        missing = is_vm & F.col(f"_raw_{vm.label}").isNull()
        rules.append((vm.label, f"label of VM {vm.name} must not be null", missing))
        rules.append((vm.label, f"label of VM {vm.name} must be 0 or 1", is_vm & ~F.col(vm.label).isin(0, 1)))
    for col in cfg.dense_features:
        rules.append((col, "must be finite", F.col(col).isin(float("nan"), float("inf"), float("-inf"))))

    aggs = [F.count("*").alias("rows")]
    for i, (col, _, bad) in enumerate(rules):
        hit = F.coalesce(bad, F.lit(False))
        aggs.append(F.sum(hit.cast("long")).alias(f"bad{i}"))
        aggs.append(F.first(F.when(hit, F.col(f"_raw_{col}")), ignorenulls=True).alias(f"ex{i}"))
    try:
        per_file = raw.groupBy("vm", "_file").agg(*aggs).collect()  # one small row per file
    except (PySparkException, Py4JJavaError) as e:  # e.g. a parquet file with a corrupt page
        raise ContractError(
            f"landing files cannot be read; vm_traffic was not changed: {_first_line(e)}"
        ) from None

    # A file with a header or schema but no rows is a broken export, not a quiet day.
    read = {_local(row["_file"]) for row in per_file}
    problems = [
        f"landing file {path}: has no rows (empty file)"
        for paths in files.values()
        for path, _ in paths
        if _local(path) not in read
    ]
    for row in per_file:
        for i, (col, rule, _) in enumerate(rules):
            if row[f"bad{i}"]:
                problems.append(
                    f"landing file {row['_file']}: column {col}: {rule} "
                    f"({row[f'bad{i}']} rows, e.g. {row[f'ex{i}']!r})"
                )
    if problems:
        raise ContractError(_listed(problems, "contract violation(s)"))
    rows: dict[str, int] = defaultdict(int)
    for row in per_file:
        rows[row["vm"]] += row["rows"]
    return dict(rows)


def _check_conflicting_labels(raw, cfg: ExfmConfig) -> dict[str, int]:
    """Requests per VM logged more than once with different labels; a ContractError with counts
    and examples when a VM's share is above ``quality.max_conflicting_labels``."""
    from pyspark.sql import functions as F

    label = F.coalesce(*[F.col(c) for c in cfg.labels])  # a VM's rows carry its own label
    per_request = raw.groupBy("vm", "request_id").agg((F.countDistinct(label) > 1).alias("conflict"))
    example = F.when(F.col("conflict"), F.col("request_id"))
    per_vm = per_request.groupBy("vm").agg(
        F.count("*").alias("requests"),
        F.sum(F.col("conflict").cast("long")).alias("conflicting"),
        F.min(example).alias("first"),
        F.max(example).alias("last"),
    )
    problems, counts = [], {}
    for row in per_vm.collect():  # one small row per VM
        counts[row["vm"]] = row["conflicting"]
        share = row["conflicting"] / row["requests"]
        if row["conflicting"] and share > cfg.quality.max_conflicting_labels:
            examples = sorted({row["first"], row["last"]})
            problems.append(
                f"VM {row['vm']}: column {cfg.vm(row['vm']).label}: {row['conflicting']} of "
                f"{row['requests']} requests ({share:.2%}) are logged more than once with different labels "
                f"(quality.max_conflicting_labels is {cfg.quality.max_conflicting_labels:.2%}), "
                f"e.g. request_id {', '.join(examples)}"
            )
    if problems:
        raise ContractError(_listed(problems, "VM(s) with conflicting labels"))
    return dict(sorted(counts.items()))
