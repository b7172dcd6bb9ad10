"""ingest on a real local SparkSession with Delta: contract, idempotency, bad input.

ingest writes the staging copy of vm_traffic; the gate (quality.run) publishes it.
"""

import glob
import shutil

import pandas as pd
import pyarrow.parquet as pq
import pytest
from delta.tables import DeltaTable

from jobs import generate, ingest, quality
from jobs.ingest import ContractError, contract_types
from jobs.lakehouse import VM_TRAFFIC, read_day

DAY, DAY2 = "2026-01-01", "2026-01-02"


def checksum(df) -> tuple[int, int]:
    """(rows, order-independent hash of every column): equal iff the content is equal."""
    from pyspark.sql import functions as F

    row = (
        df.select(F.xxhash64(*sorted(df.columns)).alias("h"))
        .agg(F.count("*").alias("n"), F.sum(F.col("h").cast("decimal(38,0)")).alias("s"))
        .first()
    )
    return row["n"], int(row["s"] or 0)


def _history(spark, cfg):
    return DeltaTable.forPath(spark, cfg.table(VM_TRAFFIC)).history().orderBy("version").collect()


def test_contract_round_trip(spark, cfg):
    generate.run(DAY, cfg)
    out = ingest.run(DAY, cfg, spark)
    quality.run(VM_TRAFFIC, DAY, cfg, spark)
    table = spark.read.format("delta").load(cfg.table(VM_TRAFFIC))
    types = dict(table.dtypes)
    for col, typ in contract_types(cfg).items():
        assert types[col] == typ, col
    assert table.columns[-2:] == ["ds", "vm"]

    for vm in cfg.vms:
        landed = pd.read_parquet(f"{cfg.landing}/ds={DAY}/vm={vm.name}")
        deduped = landed.drop_duplicates("request_id").sort_values("request_id").reset_index(drop=True)
        assert out["rows"][vm.name] == len(deduped)
        assert out["duplicates_dropped"][vm.name] == len(landed) - len(deduped) > 0
        cols = ["request_id", "event_ts", "user_id", "ad_id", *vm.features, vm.label]
        got = (
            read_day(spark, cfg, VM_TRAFFIC, ingest.parse_ds(DAY))
            .where(f"vm = '{vm.name}'")
            .select(*cols)
            .toPandas()
            .sort_values("request_id")
            .reset_index(drop=True)
        )
        expected = deduped[cols].copy()
        expected["event_ts"] = expected["event_ts"].dt.tz_localize(None)
        got["event_ts"] = pd.to_datetime(got["event_ts"])
        pd.testing.assert_frame_equal(got, expected, check_dtype=False)
        # Features of other VMs are null for this VM's rows, never made up.
        others = set(cfg.categorical_features + cfg.dense_features) - set(vm.features)
        nulls = read_day(spark, cfg, VM_TRAFFIC, ingest.parse_ds(DAY)).where(f"vm = '{vm.name}'")
        for col in others:
            assert nulls.where(f"{col} IS NOT NULL").isEmpty(), col


def test_rerun_replaces_the_day_and_keeps_other_days(spark, cfg):
    for ds in (DAY, DAY2):
        generate.run(ds, cfg)
        ingest.run(ds, cfg, spark)
        quality.run(VM_TRAFFIC, ds, cfg, spark)
    day1 = lambda: checksum(read_day(spark, cfg, VM_TRAFFIC, ingest.parse_ds(DAY)))  # noqa: E731
    day2 = lambda: checksum(read_day(spark, cfg, VM_TRAFFIC, ingest.parse_ds(DAY2)))  # noqa: E731
    before1, before2 = day1(), day2()

    ingest.run(DAY2, cfg, spark)
    quality.run(VM_TRAFFIC, DAY2, cfg, spark)
    assert (day1(), day2()) == (before1, before2)
    table = spark.read.format("delta").load(cfg.table(VM_TRAFFIC))
    assert table.count() == table.select("vm", "ds", "request_id").distinct().count()

    history = _history(spark, cfg)
    assert len(history) == 3  # one commit per published run, each a replaceWhere overwrite of its day
    for entry, ds in zip(history, (DAY, DAY2, DAY2), strict=True):
        assert entry["operation"] == "WRITE"
        assert entry["operationParameters"]["mode"] == "Overwrite"
        assert ds in entry["operationParameters"]["predicate"]


def _table_state(spark, cfg):
    """Version and content of what ingest writes: the staging copy of vm_traffic."""
    path = cfg.table(quality.staging_table(VM_TRAFFIC))
    return DeltaTable.forPath(spark, path).history(1).first()["version"], checksum(
        spark.read.format("delta").load(path)
    )


def _break(cfg, ds, vm, mutate, fmt="parquet"):
    """Add one bad file to a landing VM dir: a copy of a good one, mutated."""
    vm_dir = cfg.landing + f"/ds={ds}/vm={vm}"
    df = pd.read_parquet(f"{vm_dir}/part-00000.parquet")
    df = mutate(df)
    path = f"{vm_dir}/zz-bad.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize(
    ("mutate", "fmt", "column", "rule"),
    [
        (lambda df: df.drop(columns=["ad_quality"]), "parquet", "ad_quality", "missing contract column"),
        (lambda df: df.assign(position=["high"] * len(df)), "csv", "position", "cannot be cast to double"),
        (lambda df: df.assign(click=2), "parquet", "click", "must be 0 or 1"),
        (lambda df: df.assign(request_id=None), "parquet", "request_id", "must not be null"),
        (lambda df: df.assign(event_ts="yesterday"), "csv", "event_ts", "cannot be cast to timestamp"),
        (lambda df: df.assign(click="yes"), "parquet", "click", "cannot be cast to int"),  # text, no crash
        (lambda df: df.assign(click=0.7), "parquet", "click", "value is not an integer"),
    ],
)
def test_bad_landing_file_is_rejected_and_nothing_changes(spark, cfg, mutate, fmt, column, rule):
    generate.run(DAY, cfg)
    ingest.run(DAY, cfg, spark)
    before = _table_state(spark, cfg)

    bad = _break(cfg, DAY, "search", mutate, fmt)
    with pytest.raises(ContractError) as e:
        ingest.run(DAY, cfg, spark)
    message = str(e.value)
    assert bad.rsplit("/", 1)[-1] in message and column in message and rule in message, message
    assert _table_state(spark, cfg) == before


def test_missing_day_or_vm_is_an_error_naming_the_path(spark, cfg):
    with pytest.raises(ContractError, match="no landing data for ds=2026-01-03"):
        ingest.run("2026-01-03", cfg, spark)
    generate.run(DAY, cfg)
    shutil.rmtree(f"{cfg.landing}/ds={DAY}/vm=video")
    with pytest.raises(ContractError, match=r"no landing files for VMs \['video'\]"):
        ingest.run(DAY, cfg, spark)


def test_csv_landing_gives_the_same_table_as_parquet(spark, cfg, tmp_path):
    from tests.conftest import tiny_config

    generate.run(DAY, cfg)
    ingest.run(DAY, cfg, spark)
    csv_cfg = tiny_config(tmp_path / "csv")
    shutil.copytree(cfg.landing, csv_cfg.landing)
    for path in sorted((tmp_path / "csv" / "landing").rglob("*.parquet")):
        table = pq.read_table(path).to_pandas()
        table["event_ts"] = table["event_ts"].dt.strftime("%Y-%m-%d %H:%M:%S.%f")
        table.to_csv(path.with_suffix(".csv"), index=False)
        path.unlink()
    ingest.run(DAY, csv_cfg, spark)
    assert checksum(quality.staged_day(spark, csv_cfg, VM_TRAFFIC, DAY)) == checksum(
        quality.staged_day(spark, cfg, VM_TRAFFIC, DAY)
    )


@pytest.mark.parametrize("tz", ["UTC", None])
def test_pandas_nanosecond_export_gives_the_same_table_as_microseconds(spark, cfg, tmp_path, tz):
    """pandas' default export (pd.to_datetime: nanoseconds, tz-aware or naive = UTC) is a valid
    event time: stored as UTC microseconds, the same table as the generator's microsecond files."""
    from tests.conftest import tiny_config

    generate.run(DAY, cfg)
    ingest.run(DAY, cfg, spark)
    nanos = tiny_config(tmp_path / "nanos")
    shutil.copytree(cfg.landing, nanos.landing)
    for path in sorted((tmp_path / "nanos" / "landing").rglob("*.parquet")):
        df = pd.read_parquet(path)
        ts = pd.to_datetime(df["event_ts"].dt.strftime("%Y-%m-%d %H:%M:%S.%f"))  # as a user parses logs
        df["event_ts"] = ts.dt.tz_localize(tz) if tz else ts
        assert "[ns" in str(df["event_ts"].dtype)
        df.to_parquet(path, index=False)
    assert "ns" in str(pq.read_schema(path).field("event_ts").type)
    ingest.run(DAY, nanos, spark)
    assert checksum(quality.staged_day(spark, nanos, VM_TRAFFIC, DAY)) == checksum(
        quality.staged_day(spark, cfg, VM_TRAFFIC, DAY)
    )


def test_unreadable_files_are_all_named_with_the_reason(spark, cfg):
    generate.run(DAY, cfg)
    vm_dir = f"{cfg.landing}/ds={DAY}/vm=feed"
    good = open(f"{vm_dir}/part-00000.parquet", "rb").read()
    with open(f"{vm_dir}/zz-truncated.parquet", "wb") as f:
        f.write(good[: len(good) // 2])
    with open(f"{cfg.landing}/ds={DAY}/vm=search/zz-text.parquet", "w") as f:
        f.write("request_id,click\nr1,1\n")
    with pytest.raises(ContractError) as e:
        ingest.run(DAY, cfg, spark)
    message = str(e.value)
    assert message.startswith("2 landing file(s) cannot be ingested"), message
    for name in ("zz-truncated.parquet", "zz-text.parquet"):
        assert f"{name} cannot be read: it is not a parquet file, or it was cut short" in message, message


def _conflicts(cfg, share):
    """Log ``share`` of search's requests a second time, with the opposite label."""
    vm_dir = cfg.landing + f"/ds={DAY}/vm=search"
    df = pd.concat([pd.read_parquet(p) for p in sorted(glob.glob(f"{vm_dir}/*.parquet"))])
    twice = df.drop_duplicates("request_id").sample(frac=share, random_state=0)
    twice.assign(click=1 - twice["click"]).to_parquet(f"{vm_dir}/zz-again.parquet", index=False)
    return twice


def test_conflicting_labels_stop_the_day_with_counts_and_examples(spark, cfg):
    generate.run(DAY, cfg)
    twice = _conflicts(cfg, 0.05)
    with pytest.raises(ContractError) as e:
        ingest.run(DAY, cfg, spark)
    message = str(e.value)
    n = len(twice)
    assert f"VM search: column click: {n} of " in message and "with different labels" in message, message
    assert any(rid in message for rid in twice["request_id"]), message


def test_conflicts_below_the_allowed_share_are_resolved_without_favouring_a_label(spark, tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "quality.max_conflicting_labels=0.5")
    generate.run(DAY, cfg)
    twice = _conflicts(cfg, 0.3)
    out = ingest.run(DAY, cfg, spark)
    assert out["conflicting_labels"]["search"] == len(twice) and out["conflicting_labels"]["feed"] == 0
    kept = (
        quality.staged_day(spark, cfg, VM_TRAFFIC, DAY)
        .where("vm = 'search'")
        .select("request_id", "click")
        .toPandas()
    )
    clicks = kept.set_index("request_id").loc[twice["request_id"], "click"]
    # Before, a tie always kept the click; now either label, about evenly.
    assert 0.3 < clicks.mean() < 0.7, (clicks.mean(), len(clicks))
