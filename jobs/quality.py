"""Data-quality gates: write-audit-publish with great-expectations suites on Spark DataFrames.

A job never writes a day straight into its table. It ``stage``s the day's rows in
``<lakehouse_root>/_staging/<table>`` (replaceWhere on the day); the gate ``run`` validates the
staged day with the table's GX suite and only then publishes it into the real table
(replaceWhere of the day). A day that fails is copied to
``<lakehouse_root>/_quarantine/<table>/ds=<day>/at=<time>`` for inspection, the real table is
left exactly as it was, and ``QualityError`` names the table, column, rule and observed value.
Every run writes one row per (ds, table, suite) to Delta ``dq_results`` and rebuilds the Data
Docs site (``cfg.docs_root``).

The suites are defined in code below (versioned with the repo). Values that depend on the day
(bands from the trailing published days, the eligible teacher snapshots) are GX suite
parameters, so the stored suite is the same for every day and days can be validated in parallel.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import sys
import threading
import time
from dataclasses import dataclass

from jobs import faults
from jobs.config import CONTRACT_COLUMNS, DataError, ExfmConfig, parse_ds
from jobs.lakehouse import (
    DQ_RESULTS,
    FM_DATASET,
    FM_SNAPSHOTS,
    VM_EVAL,
    VM_TRAFFIC,
    VM_TRAINING,
    read_day,
    render_sql,
    replace_partition,
    retry_on_conflict,
    table_ref,
    table_version,
)

log = logging.getLogger(__name__)

STAGING = "_staging"
QUARANTINE = "_quarantine"
DOCS_SITE = "local_site"
FINITE = sys.float_info.max  # between(-FINITE, FINITE) is "finite": Spark orders NaN above +inf
# Ids that recur from day to day: an export that re-keyed them (a new id space) breaks that,
# although every value is well-formed; the share of rows with an id seen before is banded.
CONTINUITY_IDS = ("user_id", "ad_id")
MAX_REPORTED = 10  # failed expectations listed in one error message
SPARK_TYPES = {
    "string": "StringType",
    "timestamp": "TimestampType",
    "double": "DoubleType",
    "int": "IntegerType",
}
EVAL_METRICS = ("ne", "auc", "logloss", "calibration")

# A passing day needs the counts of unexpected values only: examples of them are one more Spark
# query per rule (7-9% of a gate's CPU on the tests' days), so only a failing day pays for them.
COUNTS_ONLY = {"result_format": "BASIC", "partial_unexpected_count": 0}
WITH_EXAMPLES = {"result_format": "BASIC", "partial_unexpected_count": 5}

# GX's file context (stores, Data Docs) is not thread-safe; days validated in threads of one
# process (tests, backfills) take turns for the GX part, Spark work outside it runs in parallel.
_GX_LOCK = threading.Lock()


class QualityError(DataError):
    """A staged day failed its suite (or there is nothing to validate); it was not published."""


@dataclass(frozen=True)
class Gate:
    suite: str
    partition_by: tuple[str, ...]
    order: tuple[str, ...] = ("event_ts", "request_id")  # sort inside partitions on write
    may_be_empty: bool = False  # a day without rows is legitimate (no models to evaluate yet)


GATES = {
    VM_TRAFFIC: Gate("vm_traffic", ("ds", "vm")),
    FM_DATASET: Gate("fm_dataset", ("ds",)),
    VM_TRAINING: Gate("teacher_scores", ("ds", "vm")),
    VM_EVAL: Gate("vm_eval", ("ds",), order=("vm", "method"), may_be_empty=True),
}


def _gate(table: str) -> Gate:
    if table not in GATES:
        raise QualityError(f"no data-quality gate for table {table!r}; gated tables: {sorted(GATES)}")
    return GATES[table]


def staging_table(table: str) -> str:
    return f"{STAGING}/{table}"


# --- write ------------------------------------------------------------------------------
def stage(df, cfg: ExfmConfig, table: str, ds: str | dt.date, partition_by: list[str] | None = None) -> None:
    """Write a job's rows of day ds to the table's staging copy (replaceWhere ds), not the table."""
    gate = _gate(table)
    partition_by = list(partition_by or gate.partition_by)
    replace_partition(df, cfg, staging_table(table), partition_by, order=gate.order, ds=parse_ds(ds))


def staged_day(spark, cfg: ExfmConfig, table: str, ds: str | dt.date):
    """The staged rows of one day (what the gate validates and publishes)."""
    return read_day(spark, cfg, staging_table(table), parse_ds(ds))


# --- audit + publish --------------------------------------------------------------------
def run(table: str, ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    """The gate of ``table`` for day ds: validate the staged day, then publish it or quarantine it."""
    gate, day = _gate(table), parse_ds(ds)
    t0 = time.perf_counter()
    if table_version(cfg, staging_table(table)) is None:
        if gate.may_be_empty:
            log.info("dq %s ds=%s suite=%s: nothing staged, nothing to publish", table, day, gate.suite)
            return {"ds": day.isoformat(), "table": table, "suite": gate.suite, "success": True, "rows": 0}
        raise QualityError(f"{table} ds={day}: nothing staged; run the step that writes {table} first")
    staged = staged_day(spark, cfg, table, day).cache()  # GX computes many metrics over it
    validated = _with_seen_ids(staged, day, cfg, spark).cache() if table == VM_TRAFFIC else staged
    try:
        params = _parameters(table, day, cfg, spark)
        with _GX_LOCK:
            outcome = _validate(gate.suite, validated, params, cfg, run_name=f"{table}-{day.isoformat()}")
        failures = [_describe(table, r, params) for r in outcome["failed"]]
        record = {
            "ds": day.isoformat(),
            "table": table,
            "suite": gate.suite,
            "success": not failures,
            "expectations": outcome["evaluated"],
            "rows": staged.count(),
            "failed_rules": failures,
            "observed": outcome["observed"],
            "data_docs": outcome["page"],
            "quarantine": None,
        }
        if failures:
            record["quarantine"] = _quarantine(staged, cfg, table, day)
            _record(record, cfg, spark)
            _log_summary(record)
            shown = failures[:MAX_REPORTED]
            more = f"\n  ... and {len(failures) - MAX_REPORTED} more" if len(failures) > MAX_REPORTED else ""
            raise QualityError(
                f"{table} ds={day} failed suite {gate.suite} ({len(failures)} of {outcome['evaluated']} "
                f"expectations); {table} was not changed, the staged day is kept in "
                f"{record['quarantine']}:\n  " + "\n  ".join(shown) + more + f"\nData Docs: {outcome['page']}"
            )
        published = _publish(table, gate, staged, day, cfg, spark)
        _record(record, cfg, spark)
        _log_summary(record)
    finally:
        staged.unpersist()
        validated.unpersist()
    return {
        **{k: record[k] for k in ("ds", "table", "suite", "success", "expectations", "rows", "observed")},
        "published": published,
        "data_docs": f"{cfg.docs_root}/index.html",
        "validation_page": outcome["page"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _publish(table: str, gate: Gate, staged, day: dt.date, cfg: ExfmConfig, spark) -> dict:
    """Copy the validated day into the real table in one commit touching only day ds.

    replaceWhere of the day: a re-run replaces every row of it (rows a re-ingest dropped go too),
    writers of other days do not conflict, and the files are laid out in arrival order, so
    training reads them directly (``lakehouse.arrow_day``) instead of sorting the day again.
    """
    replace_partition(staged, cfg, table, list(gate.partition_by), order=gate.order, ds=day)
    return {"operation": "replaceWhere", "version": table_version(cfg, table)}


def _quarantine(staged, cfg: ExfmConfig, table: str, day: dt.date) -> str:
    """Keep the failed day for inspection; every failed attempt gets its own Delta table."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = cfg.table(f"{QUARANTINE}/{table}/ds={day.isoformat()}/at={stamp}")
    staged.write.format("delta").save(path)
    return path


def _record(record: dict, cfg: ExfmConfig, spark) -> None:
    """MERGE one row into dq_results keyed on (ds, table, suite): a re-validation replaces it."""
    row = {
        **record,
        "observed": json.dumps(record["observed"], default=str, sort_keys=True),
        "validated_at": dt.datetime.now(dt.UTC).replace(tzinfo=None),
    }
    ref = table_ref(cfg, DQ_RESULTS)
    if table_version(cfg, DQ_RESULTS) is None:
        spark.sql(render_sql("dq_results_create", dq_results=ref))
    source = spark.createDataFrame([row], spark.read.format("delta").load(cfg.table(DQ_RESULTS)).schema)
    # Gates of other tables of the same day (parallel DAG tasks) write the same ds partition.
    with faults.delta_write(DQ_RESULTS, cfg.table(DQ_RESULTS)):
        retry_on_conflict(
            lambda: spark.sql(
                render_sql("dq_results_merge", dq_results=ref), args={"ds": record["ds"]}, dq_row=source
            ),
            what=f"dq_results {record['table']} ds={record['ds']}",
        )


def _log_summary(r: dict) -> None:
    failed = len(r["failed_rules"])
    log.info(
        "dq %s ds=%s suite=%s: %s, %d/%d expectations passed, %d rows%s; Data Docs %s",
        r["table"],
        r["ds"],
        r["suite"],
        "PASSED" if r["success"] else "FAILED",
        r["expectations"] - failed,
        r["expectations"],
        r["rows"],
        f", quarantined in {r['quarantine']}" if r["quarantine"] else "",
        r["data_docs"],
    )


# --- GX -----------------------------------------------------------------------------------
def _context(cfg: ExfmConfig):
    """The GX file project under the lakehouse, with its Data Docs site at cfg.docs_root."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for path in (cfg.gx_root, cfg.docs_root):
        if "://" in path:
            raise QualityError(
                f"{path}: the GX project and Data Docs need a local path (quality.gx_root/docs_root)"
            )
    ctx = gx.get_context(mode="file", project_root_dir=cfg.gx_root)
    site = {
        "class_name": "SiteBuilder",
        # Every gate rebuilds the index, which loads each validation result it lists: all of them
        # would be months of results (maintenance.data_docs_days) read again at every gate.
        "site_index_builder": {
            "class_name": "DefaultSiteIndexBuilder",
            "validation_results_limit": cfg.quality.docs_index_results,
            "view": {"module_name": "jobs.data_docs", "class_name": "IndexPageView"},
        },
        # GX's page views, whose templates compile once per machine instead of at every gate.
        "site_section_builders": {
            section: {"view": {"module_name": "jobs.data_docs", "class_name": "PageView"}}
            for section in ("expectations", "validations", "profiling")
        },
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": cfg.docs_root},
    }
    sites = ctx.list_data_docs_sites()
    if {k: sites.get(DOCS_SITE, {}).get(k) for k in site} != site:
        (ctx.update_data_docs_site if DOCS_SITE in sites else ctx.add_data_docs_site)(DOCS_SITE, site)
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in task logs
        ctx.enable_analytics(False)  # also saves the project config
    return ctx


def _validate(suite_name: str, df, params: dict, cfg: ExfmConfig, run_name: str) -> dict:
    """Run the suite on the DataFrame through a Checkpoint that updates the Data Docs."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.exceptions import DataContextError

    ctx = _context(cfg)
    try:
        source = ctx.data_sources.get("exfm")
    except KeyError:
        # persist=False: run() caches the staged day itself and unpersists it afterwards.
        source = ctx.data_sources.add_spark("exfm", persist=False)
    try:
        asset = source.get_asset(suite_name)
    except LookupError:
        asset = source.add_dataframe_asset(suite_name)
    try:
        batch = asset.get_batch_definition("day")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("day")
    expectations = SUITES[suite_name](cfg)
    # Storing a suite compares every expectation with every stored one (~0.5 s for 60, and a
    # checkpoint stores its suite again): store it only when the suite or checkpoint changed.
    fingerprint = hashlib.sha256(
        json.dumps(
            [[e.configuration.to_json_dict() for e in expectations], COUNTS_ONLY, DOCS_SITE],
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()
    try:
        checkpoint = ctx.checkpoints.get(suite_name)
        stored = checkpoint.validation_definitions[0].suite.meta.get("exfm_fingerprint")
    except DataContextError:
        stored = None
    if stored != fingerprint:
        suite = ctx.suites.add_or_update(
            gx.ExpectationSuite(suite_name, expectations=expectations, meta={"exfm_fingerprint": fingerprint})
        )
        definition = ctx.validation_definitions.add_or_update(
            gx.ValidationDefinition(name=suite_name, data=batch, suite=suite)
        )
        checkpoint = ctx.checkpoints.add_or_update(
            gx.Checkpoint(
                name=suite_name,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[DOCS_SITE])],
                result_format=COUNTS_ONLY,
            )
        )
    result = checkpoint.run(
        batch_parameters={"dataframe": df},
        expectation_parameters=params,
        run_id=RunIdentifier(run_name=run_name),
    )
    (key, validation), *_ = result.run_results.items()
    urls = ctx.get_docs_sites_urls(resource_identifier=key, site_names=[DOCS_SITE])
    failed = [r for r in validation.results if not r.success]
    if any(r.result.get("unexpected_count") for r in failed):
        # A failing day only: validated again to show examples of the values its rows broke the
        # rules with (stored in the GX project as a second run of the same name, whose retention
        # follows the day's: maintenance.data_docs).
        again = checkpoint.validation_definitions[0].run(
            batch_parameters={"dataframe": df},
            expectation_parameters=params,
            result_format=WITH_EXAMPLES,
            run_id=RunIdentifier(run_name=run_name),
        )
        failed = [r for r in again.results if not r.success]
    # The numbers worth keeping next to the verdict: row counts, means, non-null shares.
    observed = {
        _rule_name(r.expectation_config): r.result["observed_value"]
        for r in validation.results
        if isinstance(r.result.get("observed_value"), int | float)
        and not isinstance(r.result["observed_value"], bool)
    }
    return {
        "evaluated": len(validation.results),
        "failed": failed,
        "observed": observed,
        "page": urls[0]["site_url"] if urls else f"{cfg.docs_root}/index.html",
    }


def _rule_name(config) -> str:
    kw = config.kwargs
    where = kw.get("column") or ",".join(kw.get("column_list") or ()) or "table"
    if kw.get("row_condition"):  # a subset, e.g. a VM's rows: a name of its own
        where += f"; {config.description or kw['row_condition']}"
    return f"{config.type}({where})"


def _describe(table: str, r, params: dict) -> str:
    """One line per failed expectation: table, column, rule with its bounds, observed value."""
    config, res = r.expectation_config, r.result
    kw = config.kwargs
    if kw.get("column"):
        where = f"column {kw['column']}"
    elif kw.get("column_list"):
        where = f"columns {', '.join(kw['column_list'])}"
    else:
        where = "all rows"
    shown = ("min_value", "max_value", "strict_min", "strict_max", "value", "value_set", "type_")
    args = {k: _resolve(kw[k], params) for k in shown if kw.get(k) not in (None, False)}
    rule = config.type + (f" {json.dumps(args, default=str)}" if args else "")
    if config.description:
        rule += f" ({config.description})"
    error = _exception(r.exception_info)
    if error:
        observed = f"error: {error}"
    elif isinstance(res.get("observed_value"), float):
        observed = f"observed {res['observed_value']:.6g}"
    elif res.get("observed_value") is not None:
        observed = f"observed {res['observed_value']}"
    else:
        observed = (
            f"observed {res.get('unexpected_count')} of {res.get('element_count')} rows unexpected, "
            f"e.g. {res.get('partial_unexpected_list')}"
        )
    return f"table {table}, {where}: {rule}: {observed}"


def _resolve(value, params: dict):
    if isinstance(value, dict) and "$PARAMETER" in value:
        return params.get(value["$PARAMETER"])
    return value


def _exception(info) -> str | None:
    """The first exception message in GX's exception_info (flat, or keyed by metric)."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message", "")).splitlines()[0]
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message", "")).splitlines()[0]
    return None


# --- the suites ---------------------------------------------------------------------------
def _p(name: str) -> dict:
    """A suite parameter, bound per day by _parameters()."""
    return {"$PARAMETER": name}


def _label_groups(cfg: ExfmConfig) -> dict[str, list[str] | None]:
    """Label column -> the VMs that carry it, or None when every VM does (no row condition)."""
    groups = {label: [v.name for v in cfg.vms if v.label == label] for label in cfg.labels}
    return {label: None if len(vms) == len(cfg.vms) else vms for label, vms in groups.items()}


def vm_traffic_suite(cfg: ExfmConfig) -> list:
    """vm_traffic: the contract, per-row rules and the day's volume and CTR against history."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    from jobs.ingest import contract_types

    exps = []
    for col, typ in contract_types(cfg).items():
        exps.append(gxe.ExpectColumnToExist(column=col))
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=SPARK_TYPES[typ]))
    exps += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in CONTRACT_COLUMNS]
    exps += [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["ds", "vm", "request_id"]),
        gxe.ExpectColumnValuesToBeInSet(column="vm", value_set=[v.name for v in cfg.vms]),
        gxe.ExpectColumnValuesToBeBetween(
            column="event_ts", min_value=_p("day_start"), max_value=_p("day_end"), strict_max=True
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=_p("min_rows"), max_value=_p("max_rows")),
    ]
    for label, vms in _label_groups(cfg).items():
        only = {"row_condition": Column("vm").is_in(vms)} if vms else {}
        exps += [
            gxe.ExpectColumnValuesToNotBeNull(column=label, **only),
            gxe.ExpectColumnValuesToBeInSet(column=label, value_set=[0, 1]),
            gxe.ExpectColumnMeanToBeBetween(
                column=label, min_value=_p(f"min_mean_{label}"), max_value=_p(f"max_mean_{label}")
            ),
        ]
    for vm in cfg.vms:  # the same bands per VM: one VM's change must not hide in the day's total
        of_vm = {"row_condition": Column("vm").is_in([vm.name]), "description": f"rows of VM {vm.name}"}
        exps += [
            gxe.ExpectTableRowCountToBeBetween(
                min_value=_p(f"min_rows_vm_{vm.name}"), max_value=_p(f"max_rows_vm_{vm.name}"), **of_vm
            ),
            gxe.ExpectColumnMeanToBeBetween(
                column=vm.label,
                min_value=_p(f"min_mean_vm_{vm.name}"),
                max_value=_p(f"max_mean_vm_{vm.name}"),
                **of_vm,
            ),
        ]
    for col, vm, name in _continuity_scopes(cfg):  # the day's rows, then each VM's (one may re-key alone)
        of_vm = {"row_condition": Column("vm").is_in([vm]), "description": f"rows of VM {vm}"} if vm else {}
        exps.append(
            gxe.ExpectColumnMeanToBeBetween(
                column=f"{col}_seen",
                min_value=_p(f"min_seen_{name}"),
                max_value=_p(f"max_seen_{name}"),
                **(of_vm or {"description": f"share of the rows whose {col} was seen in the trailing days"}),
            )
        )
    for col in cfg.dense_features:
        lo, hi = cfg.quality.dense_ranges.get(col, (-FINITE, FINITE))
        exps.append(gxe.ExpectColumnValuesToBeBetween(column=col, min_value=lo, max_value=hi))
    return exps


def fm_dataset_suite(cfg: ExfmConfig) -> list:
    """fm_dataset: one row per request of the FM's source VMs of the day, the FM's features, labels."""
    import great_expectations.expectations as gxe

    features = (*cfg.fm_categorical_features, *cfg.fm_dense_features)
    columns = [*CONTRACT_COLUMNS, *features, *cfg.labels, "source_vms"]
    exps = [gxe.ExpectColumnToExist(column=c) for c in columns]
    exps += [
        gxe.ExpectTableRowCountToEqual(value=_p("requests")),
        gxe.ExpectColumnValuesToNotBeNull(column="request_id"),
        gxe.ExpectColumnValuesToBeUnique(column="request_id"),
    ]
    # A feature a VM declares carries values; all-null means a VM's view got lost.
    exps += [
        gxe.ExpectColumnProportionOfNonNullValuesToBeBetween(column=c, min_value=0, strict_min=True)
        for c in features
    ]
    for label, vms in _label_groups(cfg).items():
        if vms is None:
            exps.append(gxe.ExpectColumnValuesToNotBeNull(column=label))
        else:  # only requests a VM with this label saw carry it
            seen = ", ".join(f"'{v}'" for v in vms)  # registry identifiers, not data values
            exps.append(
                gxe.UnexpectedRowsExpectation(
                    unexpected_rows_query=(
                        f"SELECT * FROM {{batch}} WHERE `{label}` IS NULL "
                        f"AND arrays_overlap(source_vms, array({seen}))"
                    ),
                    description=f"{label} not null for requests of VMs {vms}",
                )
            )
    return exps


def teacher_scores_suite(cfg: ExfmConfig) -> list:
    """vm_training: a valid, leak-free, roughly calibrated teacher score for every traffic row."""
    import great_expectations.expectations as gxe

    exps = []
    for col, typ in (
        ("teacher_score", "double"),
        ("teacher_logit", "double"),
        ("teacher_snapshot_id", "string"),
    ):
        exps.append(gxe.ExpectColumnToExist(column=col))
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=SPARK_TYPES[typ]))
    return exps + [
        gxe.ExpectTableRowCountToEqual(value=_p("traffic_rows")),
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["ds", "vm", "request_id"]),
        gxe.ExpectColumnValuesToNotBeNull(column="teacher_score"),
        gxe.ExpectColumnValuesToBeBetween(
            column="teacher_score", min_value=0, max_value=1, strict_min=True, strict_max=True
        ),
        gxe.ExpectColumnValuesToNotBeNull(column="teacher_snapshot_id"),
        gxe.ExpectColumnValuesToBeInSet(
            column="teacher_snapshot_id",
            value_set=_p("eligible_snapshots"),
            description="snapshots trained through a day before ds (no label leakage)",
        ),
        gxe.ExpectColumnMeanToBeBetween(
            column="teacher_score", min_value=_p("min_teacher_mean"), max_value=_p("max_teacher_mean")
        ),
    ]


def vm_eval_suite(cfg: ExfmConfig) -> list:
    """vm_eval: finite metrics, NE > 0, AUC in [0, 1], one row per (vm, method)."""
    import great_expectations.expectations as gxe

    exps = [gxe.ExpectColumnToExist(column=c) for c in ("vm", "method", "n", *EVAL_METRICS)]
    exps += [
        gxe.ExpectColumnValuesToBeBetween(column=c, min_value=-FINITE, max_value=FINITE) for c in EVAL_METRICS
    ]
    return exps + [
        gxe.ExpectCompoundColumnsToBeUnique(column_list=["ds", "vm", "method"]),
        gxe.ExpectColumnValuesToNotBeNull(column="ne"),
        gxe.ExpectColumnValuesToBeBetween(column="ne", min_value=0, max_value=FINITE, strict_min=True),
        gxe.ExpectColumnValuesToBeBetween(column="auc", min_value=0, max_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="n", min_value=1),
    ]


SUITES = {
    "vm_traffic": vm_traffic_suite,
    "fm_dataset": fm_dataset_suite,
    "teacher_scores": teacher_scores_suite,
    "vm_eval": vm_eval_suite,
}


# --- the day's suite parameters -------------------------------------------------------------
def _parameters(table: str, day: dt.date, cfg: ExfmConfig, spark) -> dict:
    from pyspark.sql import functions as F

    if table == VM_TRAFFIC:
        history = _trailing_history(day, cfg, spark)  # one query serves both kinds of band
        return {
            "day_start": f"{day.isoformat()} 00:00:00",
            "day_end": f"{(day + dt.timedelta(days=1)).isoformat()} 00:00:00",
            **_trailing_bands(history, cfg),
            **_continuity_bands(day, cfg, spark, seen_traffic=bool(history)),
        }
    if table == FM_DATASET:
        from jobs.fm_dataset import fm_traffic

        traffic = fm_traffic(cfg, spark).where(F.col("ds") == day.isoformat())
        return {"requests": traffic.select("request_id").distinct().count()}
    if table == VM_TRAINING:
        traffic = read_day(spark, cfg, VM_TRAFFIC, day)
        stats = traffic.agg(F.count("*").alias("rows"), F.avg(F.coalesce(*cfg.labels)).alias("ctr")).first()
        eligible = []
        if table_version(cfg, FM_SNAPSHOTS) is not None:
            snaps = spark.read.format("delta").load(cfg.table(FM_SNAPSHOTS))
            eligible = [
                r.snapshot_id
                for r in snaps.where(F.col("trained_through_ds") < day.isoformat())
                .select("snapshot_id")
                .collect()
            ]
        ctr, f = stats["ctr"] or 0.0, cfg.quality.teacher_ctr_factor
        return {
            "traffic_rows": stats["rows"],
            "eligible_snapshots": sorted(eligible),
            "min_teacher_mean": ctr / f,
            "max_teacher_mean": min(1.0, ctr * f),
        }
    return {}


def _with_seen_ids(staged, day: dt.date, cfg: ExfmConfig, spark):
    """The staged day with ``<id>_seen`` (1.0 or 0.0) for each of ``CONTINUITY_IDS``: whether the
    row's id occurs in the published vm_traffic of the trailing days. Validated, never published."""
    from pyspark.sql import functions as F

    out, history = staged, _trailing_traffic(day, cfg, spark)
    for col in CONTINUITY_IDS:
        if history is None:
            out = out.withColumn(f"{col}_seen", F.lit(0.0))
            continue
        seen = history.select(col).distinct().withColumn(f"{col}_seen", F.lit(1.0))
        out = out.join(seen, col, "left").fillna(0.0, subset=[f"{col}_seen"])
    return out


def _trailing_traffic(day: dt.date, cfg: ExfmConfig, spark):
    """The published vm_traffic of the ``quality.trailing_days`` before ds, or None before any."""
    from pyspark.sql import functions as F

    if table_version(cfg, VM_TRAFFIC) is None:
        return None
    start = day - dt.timedelta(days=cfg.quality.trailing_days)
    return (
        spark.read.format("delta")
        .load(cfg.table(VM_TRAFFIC))
        .where((F.col("ds") >= start.isoformat()) & (F.col("ds") < day.isoformat()))
    )


def _continuity_scopes(cfg: ExfmConfig) -> list[tuple[str, str, str]]:
    """(id column, VM or "" for the whole day, parameter suffix) of every banded seen-id share."""
    return [
        (col, vm, col + (vm and f"_vm_{vm}"))
        for col in CONTINUITY_IDS
        for vm in ("", *(v.name for v in cfg.vms))
    ]


def _continuity_bands(day: dt.date, cfg: ExfmConfig, spark, seen_traffic: bool) -> dict:
    """Bands of the seen-id shares: around their mean on the trailing days that passed their gate.

    A day without published days before it (``seen_traffic`` false) sees nothing (band [0, 1], its
    share 0 does not count later); with traffic but no share recorded yet, the band is
    [quality.min_id_seen_share, 1].
    """
    from pyspark.sql import functions as F

    q = cfg.quality
    start = day - dt.timedelta(days=q.trailing_days)
    floor = q.min_id_seen_share if seen_traffic else 0.0
    bands = {}
    for _, _, name in _continuity_scopes(cfg):
        bands[f"min_seen_{name}"], bands[f"max_seen_{name}"] = floor, 1.0
    if not seen_traffic or table_version(cfg, DQ_RESULTS) is None:
        return bands
    observed = [
        json.loads(r["observed"])
        for r in spark.read.format("delta")
        .load(cfg.table(DQ_RESULTS))
        .where(
            (F.col("table") == VM_TRAFFIC)
            & F.col("success")
            & (F.col("ds") >= start.isoformat())
            & (F.col("ds") < day.isoformat())
        )
        .select("observed")
        .collect()
    ]
    for col, vm, name in _continuity_scopes(cfg):
        rule = f"expect_column_mean_to_be_between({col}_seen{vm and f'; rows of VM {vm}'})"  # _rule_name
        shares = [o[rule] for o in observed if o.get(rule, 0) > 0]
        if shares:
            mean, f = sum(shares) / len(shares), q.id_continuity_factor
            bands[f"min_seen_{name}"], bands[f"max_seen_{name}"] = max(floor, mean / f), min(1.0, mean * f)
    return bands


def _trailing_history(day: dt.date, cfg: ExfmConfig, spark) -> list:
    """One small row per VM of the published vm_traffic days before ds (days, rows, positives);
    empty before any."""
    from pyspark.sql import functions as F

    traffic = _trailing_traffic(day, cfg, spark)
    if traffic is None:
        return []
    label = F.coalesce(*[F.col(c) for c in cfg.labels])  # a VM's rows carry its own label
    return (
        traffic.groupBy("vm")
        .agg(
            F.countDistinct("ds").alias("days"),
            F.count("*").alias("rows"),
            F.sum(label).alias("positives"),
        )
        .collect()
    )


def _trailing_bands(history: list, cfg: ExfmConfig) -> dict:
    """Row count and label-mean bands from the trailing days' ``history`` (``_trailing_history``):
    the day's (``min_rows``, ``min_mean_<label>``, ...) and each VM's (``min_rows_vm_<vm>``, ...)."""
    q = cfg.quality
    bands = {"min_rows": 1, "max_rows": None}  # an empty day never passes
    bands |= {f"min_mean_{label}": 0.0 for label in cfg.labels}
    bands |= {f"max_mean_{label}": 1.0 for label in cfg.labels}
    bands |= {f"min_rows_vm_{vm.name}": 1 for vm in cfg.vms} | {
        f"max_rows_vm_{vm.name}": None for vm in cfg.vms
    }
    bands |= {f"min_mean_vm_{vm.name}": 0.0 for vm in cfg.vms} | {
        f"max_mean_vm_{vm.name}": 1.0 for vm in cfg.vms
    }
    days = max((r["days"] for r in history), default=0)
    if not days:
        return bands

    def rows_band(rows_per_day: float) -> tuple[int, int]:
        return max(1, math.floor(rows_per_day / q.row_count_factor)), math.ceil(
            rows_per_day * q.row_count_factor
        )

    def mean_band(mean: float) -> tuple[float, float]:
        return mean / q.ctr_factor, min(1.0, mean * q.ctr_factor)

    bands["min_rows"], bands["max_rows"] = rows_band(sum(r["rows"] for r in history) / days)
    of_vm = {r["vm"]: r for r in history if r["vm"] in {vm.name for vm in cfg.vms}}
    for label in cfg.labels:  # a label's rows are those of the VMs that carry it
        rows = [of_vm[vm.name] for vm in cfg.vms if vm.label == label and vm.name in of_vm]
        if rows:
            mean = sum(r["positives"] for r in rows) / sum(r["rows"] for r in rows)
            bands[f"min_mean_{label}"], bands[f"max_mean_{label}"] = mean_band(mean)
    for vm, r in of_vm.items():
        bands[f"min_rows_vm_{vm}"], bands[f"max_rows_vm_{vm}"] = rows_band(r["rows"] / r["days"])
        bands[f"min_mean_vm_{vm}"], bands[f"max_mean_vm_{vm}"] = mean_band(r["positives"] / r["rows"])
    return bands
