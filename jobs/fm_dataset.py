"""build-fm-dataset: all VMs' traffic of day ds -> Delta ``fm_dataset`` partitioned by ds.

One row per request_id with the union of the VMs' feature sets, the labels and the list of
source VMs (sql/fm_dataset.sql), built from the published vm_traffic. The day is staged
(replaceWhere ds on ``_staging/fm_dataset``) and published by the gate
(``quality.run("fm_dataset", ...)``), so a re-run is idempotent.
"""

from __future__ import annotations

import datetime as dt

from jobs import quality
from jobs.config import ExfmConfig, parse_ds
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, quote, read_day, render_sql, table_version


def query(cfg: ExfmConfig) -> str:
    """sql/fm_dataset.sql with the registry's feature and label columns filled in."""

    def merged(cols):
        return ",\n  ".join(f"max({quote(c)}) AS {quote(c)}" for c in cols)

    return render_sql(
        "fm_dataset",
        feature_columns=merged((*cfg.fm_categorical_features, *cfg.fm_dense_features)),
        label_columns=merged(cfg.labels),
    )


def requests(cfg: ExfmConfig, spark, day: dt.date, *, every_vm: bool = False):
    """vm_traffic of one day merged to one row per request, with the FM's features.

    The requests of the FM's source VMs (``fm.source_vms``), or of ``every_vm`` for the DAS,
    which scores every VM's rows with what the FM knows.
    """
    if table_version(cfg, VM_TRAFFIC) is None or read_day(spark, cfg, VM_TRAFFIC, day).isEmpty():
        raise ValueError(
            f"vm_traffic has no rows for ds={day}: run `exfm ingest --ds {day}` and "
            f"`exfm validate --table vm_traffic --ds {day}` first"
        )
    traffic = fm_traffic(cfg, spark, every_vm=every_vm)
    return spark.sql(query(cfg), args={"ds": day.isoformat()}, vm_traffic=traffic)


def fm_traffic(cfg: ExfmConfig, spark, *, every_vm: bool = False):
    """vm_traffic, restricted to the FM's source VMs unless ``every_vm``."""
    from pyspark.sql import functions as F

    traffic = spark.read.format("delta").load(cfg.table(VM_TRAFFIC))
    if every_vm or not cfg.fm.source_vms:
        return traffic
    return traffic.where(F.col("vm").isin([v.name for v in cfg.fm_vms]))


def run(ds: str | dt.date, cfg: ExfmConfig, spark) -> dict:
    from pyspark.sql import functions as F

    day = parse_ds(ds)
    quality.stage(requests(cfg, spark, day), cfg, FM_DATASET, day)

    stats = (
        quality.staged_day(spark, cfg, FM_DATASET, day)
        .agg(
            F.count("*").alias("rows"),
            F.sum((F.size("source_vms") > 1).cast("long")).alias("shared"),
        )
        .first()
    )
    return {
        "ds": day.isoformat(),
        "rows": stats["rows"],
        "shared_requests": stats["shared"],
        "staged_version": table_version(cfg, quality.staging_table(FM_DATASET)),
    }
