"""build-fm-dataset on real Spark + Delta: one row per request, the union of the VMs' views."""

import pytest
from delta.tables import DeltaTable

from jobs import fm_dataset, generate, ingest, quality
from jobs.config import parse_ds
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, read_day
from tests.conftest import tiny_config
from tests.test_ingest import checksum

DAY = "2026-01-01"


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("fm"))
    generate.run(DAY, cfg)
    ingest.run(DAY, cfg, spark)
    quality.run(VM_TRAFFIC, DAY, cfg, spark)
    out = fm_dataset.run(DAY, cfg, spark)
    quality.run(FM_DATASET, DAY, cfg, spark)
    return cfg, out


def test_schema_is_the_union_of_the_vms_features(spark, built):
    cfg, _ = built
    table = spark.read.format("delta").load(cfg.table(FM_DATASET))
    assert table.columns == [
        "request_id",
        "event_ts",
        "user_id",
        "ad_id",
        *cfg.categorical_features,
        *cfg.dense_features,
        *cfg.labels,
        "source_vms",
        "ds",
    ]
    types = dict(table.dtypes)
    assert types["source_vms"] == "array<string>" and types["event_ts"] == "timestamp"
    assert all(types[c] == "string" for c in cfg.categorical_features)
    assert all(types[c] == "double" for c in cfg.dense_features)
    assert DeltaTable.forPath(spark, cfg.table(FM_DATASET)).detail().first()["partitionColumns"] == ["ds"]


def test_one_row_per_request_with_merged_views(spark, built):
    cfg, out = built
    day = parse_ds(DAY)
    fm = read_day(spark, cfg, FM_DATASET, day)
    traffic = read_day(spark, cfg, VM_TRAFFIC, day)
    assert out["rows"] == fm.count() == fm.select("request_id").distinct().count()
    assert out["rows"] == traffic.select("request_id").distinct().count()
    assert out["shared_requests"] > 0

    # A request seen by feed and search carries feed-only and search-only features,
    # but not video-only ones.
    row = fm.where(
        "array_contains(source_vms, 'feed') AND array_contains(source_vms, 'search') "
        "AND NOT array_contains(source_vms, 'video')"
    ).first()
    assert row["source_vms"] == ["feed", "search"]
    only = {
        name: set(cfg.vm(name).features) - {f for v in cfg.vms if v.name != name for f in v.features}
        for name in ("feed", "search", "video")
    }
    for col in cfg.vm("feed").features + cfg.vm("search").features:
        assert row[col] is not None, col
    for col in only["video"]:
        assert row[col] is None, col
    assert row["click"] in (0, 1)


def test_rerun_is_idempotent(spark, built):
    cfg, _ = built
    day = parse_ds(DAY)
    before = checksum(read_day(spark, cfg, FM_DATASET, day))
    fm_dataset.run(DAY, cfg, spark)
    quality.run(FM_DATASET, DAY, cfg, spark)
    assert checksum(read_day(spark, cfg, FM_DATASET, day)) == before
    history = DeltaTable.forPath(spark, cfg.table(FM_DATASET)).history().collect()
    assert len(history) == 2
    assert all(
        h["operationParameters"]["predicate"] and h["operationParameters"]["mode"] == "Overwrite"
        for h in history
    )


def test_missing_traffic_is_a_clear_error(spark, built):
    cfg, _ = built
    with pytest.raises(ValueError, match="vm_traffic has no rows for ds=2026-01-09"):
        fm_dataset.run("2026-01-09", cfg, spark)


def test_query_renders_and_explains(spark, built):
    cfg, _ = built
    traffic = spark.read.format("delta").load(cfg.table(VM_TRAFFIC))
    assert spark.sql("EXPLAIN " + fm_dataset.query(cfg), args={"ds": DAY}, vm_traffic=traffic).first()[0]


def test_control_arm_fm_after_its_warmup_teaches_every_vm(spark, tmp_path):
    """fm.source_vms=[feed]: the FM dataset holds feed's requests and features only, while the
    DAS still scores every VM's rows (with the features the FM knows). fm.warmup_days=1: no VM
    trains before the FM has a day behind it; then they start with its scores."""
    from jobs import das, publishing, train_fm, train_vm
    from jobs.lakehouse import VM_TRAINING
    from tests.conftest import land_days

    cfg = tiny_config(tmp_path, "fm.source_vms=[feed]", "fm.warmup_days=1")
    days = [parse_ds(DAY), parse_ds("2026-01-02")]
    land_days(days, cfg, spark)
    fm = read_day(spark, cfg, FM_DATASET, days[0])
    feed = read_day(spark, cfg, VM_TRAFFIC, days[0]).where("vm = 'feed'")
    assert fm.count() == feed.select("request_id").distinct().count()
    assert {tuple(r.source_vms) for r in fm.select("source_vms").distinct().collect()} == {("feed",)}
    others = {f for v in cfg.vms for f in v.features} - set(cfg.vm("feed").features)
    assert others and not others & set(fm.columns)  # the FM never sees another VM's features

    assert publishing.in_fm_warmup(days[0], cfg, spark)
    with pytest.raises(ValueError, match="warm-up"):
        train_vm.run(days[0], "video", cfg, spark, method="ah_sa")
    snapshot = train_fm.run(days[0], cfg, spark)["published"]
    assert snapshot["status"] == "blessed"
    publishing.update_pointer(cfg, spark)
    assert not publishing.in_fm_warmup(days[1], cfg, spark)
    das.run(days[1], cfg, spark)
    quality.run(VM_TRAINING, days[1], cfg, spark)
    scored = read_day(spark, cfg, VM_TRAINING, days[1])
    assert scored.count() == read_day(spark, cfg, VM_TRAFFIC, days[1]).count()
    assert {r.vm for r in scored.select("vm").distinct().collect()} == {v.name for v in cfg.vms}
    out = train_vm.run(days[1], "video", cfg, spark, method="ah_sa")  # a new chain, taught from day one
    assert not out["cold_start"] and out["teacher_snapshot_id"] == snapshot["snapshot_id"]
