"""Data-quality gates on real Spark + Delta with real GX suites: write-audit-publish.

One small world of two good days (every gate passed, the FM trained on day 1 scored day 2),
then a corpus of bad inputs for the already published day 2: each must be stopped by the right
step with a message naming table/file, column and rule, change no published table, and be kept
for inspection. Tests run in file order; the corpus restores the landing files after each case.
"""

import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
from pyspark.sql import functions as F

from jobs import das, fm_dataset, generate, ingest, publishing, quality, train_fm
from jobs.cli import main
from jobs.ingest import ContractError
from jobs.lakehouse import FM_DATASET, VM_EVAL, VM_TRAFFIC, VM_TRAINING, read_day, table_version
from jobs.quality import QualityError
from tests.conftest import REPO, TINY, tiny_config
from tests.test_ingest import checksum

D1, D2 = DAYS = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]
TABLES = (VM_TRAFFIC, FM_DATASET, VM_TRAINING)


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory):
    """Days 1-2 ingested, built and published through their gates; the FM of day 1 scored day 2."""
    root = tmp_path_factory.mktemp("quality")
    cfg = tiny_config(root)
    gates = []
    for day in DAYS:
        generate.run(day, cfg)
        ingest.run(day, cfg, spark)
        gates.append(quality.run(VM_TRAFFIC, day, cfg, spark))
        fm_dataset.run(day, cfg, spark)
        gates.append(quality.run(FM_DATASET, day, cfg, spark))
    train_fm.run(D1, cfg, spark)
    publishing.update_pointer(cfg, spark)
    das.run(D2, cfg, spark)
    gates.append(quality.run(VM_TRAINING, D2, cfg, spark))
    shutil.copytree(_landing(cfg, D2), root / "pristine")
    good = {(t, d): checksum(read_day(spark, cfg, t, d)) for t in TABLES for d in DAYS}
    return SimpleNamespace(root=root, cfg=cfg, gates=gates, good=good)


def _landing(cfg, day) -> Path:
    return Path(cfg.landing) / f"ds={day}"


def _dq_rows(spark, cfg, day=None, table=None) -> list:
    df = spark.read.format("delta").load(cfg.table(quality.DQ_RESULTS))
    if day:
        df = df.where(F.col("ds") == str(day))
    if table:
        df = df.where(F.col("table") == table)
    return df.collect()


# --- the good days ---------------------------------------------------------------------------
def test_good_days_pass_every_gate_and_are_published_as_validated(spark, world):
    cfg = world.cfg
    assert [(g["table"], g["ds"], g["success"]) for g in world.gates] == [
        *[(t, str(d), True) for d in DAYS for t in (VM_TRAFFIC, FM_DATASET)],
        (VM_TRAINING, str(D2), True),
    ]
    by_table = {g["table"]: g for g in world.gates}
    assert by_table[VM_TRAINING]["suite"] == "teacher_scores"
    assert by_table[VM_TRAINING]["published"]["operation"] == "replaceWhere"
    assert by_table[VM_TRAFFIC]["published"]["operation"] == "replaceWhere"
    # The row-count and CTR bands had history on day 2 and observed the day's values.
    assert by_table[VM_TRAFFIC]["observed"]["expect_table_row_count_to_be_between(table)"] > 1000
    assert 0 < by_table[VM_TRAFFIC]["observed"]["expect_column_mean_to_be_between(click)"] < 0.2
    json.dumps(world.gates)  # XCom-able
    for table in TABLES:  # what readers see is exactly what the gate validated
        assert checksum(read_day(spark, cfg, table, D2)) == checksum(
            quality.staged_day(spark, cfg, table, D2)
        )
    rows = _dq_rows(spark, cfg)
    assert len(rows) == len(world.gates) and all(r.success and not r.failed_rules for r in rows)
    assert {r.suite for r in rows} == {"vm_traffic", "fm_dataset", "teacher_scores"}


def test_data_docs_site_is_built_and_linked(world):
    cfg = world.cfg
    index = Path(cfg.docs_root) / "index.html"
    assert index.exists() and all(g["data_docs"] == str(index) for g in world.gates)
    html = index.read_text()
    assert all(suite in html for suite in ("vm_traffic", "fm_dataset", "teacher_scores"))
    page = Path(unquote(urlparse(world.gates[-1]["validation_page"]).path))
    assert page.exists() and "teacher_snapshot_id" in page.read_text()


def test_data_docs_index_lists_the_newest_results_only(spark, world):
    """Each gate rebuilds the index: it reads only the results it lists, the newest ones."""
    index = Path(world.cfg.docs_root) / "index.html"

    def listed() -> set[str]:
        return set(re.findall(r"'_table_row_link_path': '(validations/[^']+)'", index.read_text()))

    before = listed()
    assert len(before) == len(world.gates)  # fewer than quality.docs_index_results (60)
    short = world.cfg.model_copy(
        update={"quality": world.cfg.quality.model_copy(update={"docs_index_results": 2})}
    )
    newest = Path(unquote(urlparse(quality.run(VM_TRAINING, D2, short, spark)["validation_page"]).path))
    now = listed()
    (added,) = now - before
    assert len(now) == 2 and str(newest).endswith(added)
    assert all((Path(world.cfg.docs_root) / page).exists() for page in before)  # pages stay
    quality.run(VM_TRAINING, D2, world.cfg, spark)  # the configured limit again: all of them
    assert len(listed()) == len(world.gates) + 2


def test_data_docs_pages_render_from_compiled_templates(world):
    """The site's views are ours, and the gates left their compiled templates in Jinja's cache."""
    from jobs import data_docs

    site = quality._context(world.cfg).list_data_docs_sites()[quality.DOCS_SITE]
    views = [site["site_index_builder"]["view"], *(s["view"] for s in site["site_section_builders"].values())]
    assert {v["module_name"] for v in views} == {"jobs.data_docs"}
    for view in (data_docs.PageView(), data_docs.IndexPageView()):
        env = view.env
        source, filename, _ = env.loader.get_source(env, view._template)
        assert env.bytecode_cache.get_bucket(env, view._template, filename, source).code is not None


def test_revalidation_is_idempotent(spark, world):
    cfg = world.cfg
    again = quality.run(VM_TRAFFIC, D1, cfg, spark)
    assert again["success"]
    assert checksum(read_day(spark, cfg, VM_TRAFFIC, D1)) == world.good[(VM_TRAFFIC, D1)]
    assert len(_dq_rows(spark, cfg, D1, VM_TRAFFIC)) == 1
    assert len(_dq_rows(spark, cfg)) == len(world.gates)


def test_a_gate_stores_its_suite_only_when_the_suite_changed(spark, world):
    """A re-validation with the same suite leaves the GX project's copy alone (storing it costs
    ~0.5 s per store); another suite (a wider range of a dense feature) is stored and used."""
    cfg = world.cfg
    stored = Path(cfg.gx_root) / "gx" / "expectations" / "vm_traffic.json"
    before = stored.stat().st_mtime_ns
    assert quality.run(VM_TRAFFIC, D1, cfg, spark)["success"]
    assert stored.stat().st_mtime_ns == before
    ranges = {**cfg.quality.dense_ranges, "position": (-1.0, 123.5)}
    wider = cfg.model_copy(update={"quality": cfg.quality.model_copy(update={"dense_ranges": ranges})})
    assert quality.run(VM_TRAFFIC, D1, wider, spark)["success"]
    assert stored.stat().st_mtime_ns != before and "123.5" in stored.read_text()


# --- the corpus of bad inputs ---------------------------------------------------------------
STEPS = ("ingest", "validate vm_traffic", "build-fm-dataset", "validate fm_dataset", "das-score")
STEPS += ("validate vm_training",)


def _pipeline(day, cfg, spark, start: str) -> tuple[str | None, str]:
    """Day ``day`` from step ``start`` on, as the DAG runs it: the failing step and its message."""
    run = {
        "ingest": lambda: ingest.run(day, cfg, spark),
        "build-fm-dataset": lambda: fm_dataset.run(day, cfg, spark),
        "das-score": lambda: das.run(day, cfg, spark),
        **{f"validate {t}": (lambda t=t: quality.run(t, day, cfg, spark)) for t in TABLES},
    }
    for step in STEPS[STEPS.index(start) :]:
        try:
            run[step]()
        except (ContractError, QualityError) as e:
            return step, str(e)
    return None, ""


def _state(spark, cfg) -> dict:
    """Version and data files of every published table: equal iff nothing was committed."""
    return {
        t: (table_version(cfg, t), sorted(spark.read.format("delta").load(cfg.table(t)).inputFiles()))
        for t in TABLES
    }


def _rewrite(cfg, vm, change, fmt="parquet", every_file=False):
    """Replace a VM's landing file(s) of day 2 by a changed copy (as parquet or CSV)."""
    files = sorted((_landing(cfg, D2) / f"vm={vm}").glob("*.parquet"))
    for path in files if every_file else files[:1]:
        df = change(pd.read_parquet(path))
        path.unlink()
        if fmt == "csv":
            df.to_csv(path.with_suffix(".csv"), index=False)
        else:  # microseconds, as Spark reads them (nanosecond timestamps are a case of their own)
            df.to_parquet(path, index=False, coerce_timestamps="us")
    return "ingest"


def _every_vm(cfg, change):
    for vm in cfg.vms:
        _rewrite(cfg, vm.name, change, every_file=True)
    return "ingest"


def _re_key_users(df):
    return df.assign(user_id=df["user_id"].str[1:].astype("int64") * 7919 + 1_000_003)


def _truncate(cfg):
    path = sorted((_landing(cfg, D2) / "vm=search").glob("*.parquet"))[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "ingest"


def _add_file(cfg, vm, name, content: bytes):
    (_landing(cfg, D2) / f"vm={vm}" / name).write_bytes(content)
    return "ingest"


def _conflicting_copy(cfg, vm):
    vm_dir = _landing(cfg, D2) / f"vm={vm}"
    df = pd.read_parquet(sorted(vm_dir.glob("*.parquet"))[0]).drop_duplicates("request_id")
    again = df.sample(frac=0.05, random_state=0)
    again.assign(click=1 - again["click"]).to_parquet(vm_dir / "again.parquet", coerce_timestamps="us")
    return "ingest"


def _unknown_vm(cfg):
    shutil.copytree(_landing(cfg, D2) / "vm=feed", _landing(cfg, D2) / "vm=shopping")
    return "ingest"


def _stage(spark, cfg, table, change, day=D2):
    """A buggy job: stage a changed copy of the published day, then run the pipeline from its gate."""
    quality.stage(change(read_day(spark, cfg, table, day)), cfg, table, day)
    return f"validate {table}"


def _leaking_teacher(spark, cfg):
    """Day 1 scored by the FM trained through day 1 (it saw these labels), otherwise plausible."""
    leak = publishing.resolve_for_day(D2, cfg, spark).snapshot_id
    scored = (
        read_day(spark, cfg, VM_TRAFFIC, D1)
        .withColumn("teacher_logit", F.lit(-3.0))
        .withColumn("teacher_score", F.lit(0.047))
        .withColumn("teacher_snapshot_id", F.lit(leak))
    )
    quality.stage(scored, cfg, VM_TRAINING, D1)
    return "validate vm_training"


@dataclass(frozen=True)
class Case:
    id: str
    mutate: object  # (cfg, spark) -> the first step to run
    step: str  # the step that must stop it
    expect: tuple[str, ...]  # fragments of the message: table or file, column, rule, observed
    day: dt.date = D2


def _every(df, k: int):
    """One request in k (by request_id, so a duplicated log line keeps its copy's label)."""
    return df["request_id"].str[-4:].astype(int) % k == 0


def _ten_x(df):
    copies = [df.assign(request_id=df["request_id"] + f"-{k}") for k in range(10)]
    return pd.concat(copies, ignore_index=True)


CASES = [
    # ingest refuses what it cannot read or what breaks the contract, before writing anything
    Case(
        "missing_column",
        lambda c, s: _rewrite(c, "search", lambda df: df.drop(columns=["ad_quality"])),
        "ingest",
        ("landing file", "vm=search", "ad_quality", "missing contract column"),
    ),
    Case(
        "wrong_type",
        lambda c, s: _rewrite(c, "search", lambda df: df.assign(position="high"), fmt="csv"),
        "ingest",
        ("landing file", "position", "cannot be cast to double", "'high'"),
    ),
    Case(
        "unparseable_timestamp",
        lambda c, s: _rewrite(c, "video", lambda df: df.assign(event_ts="yesterday"), fmt="csv"),
        "ingest",
        ("landing file", "event_ts", "cannot be cast to timestamp", "'yesterday'"),
    ),
    Case(
        "fractional_label",
        lambda c, s: _rewrite(c, "feed", lambda df: df.assign(click=0.5)),
        "ingest",
        ("landing file", "click", "value is not an integer", "0.5"),
    ),
    Case(
        "null_labels",
        lambda c, s: _rewrite(
            c, "feed", lambda df: df.assign(click=pd.array([None] * len(df), dtype="Int32"))
        ),
        "ingest",
        ("landing file", "click", "label of VM feed must not be null"),
    ),
    Case(
        "nan_inf_features",
        lambda c, s: _rewrite(
            c, "feed", lambda df: df.assign(ad_quality=np.where(df.index % 2, np.nan, np.inf))
        ),
        "ingest",
        ("landing file", "ad_quality", "must be finite"),
    ),
    Case(
        "truncated_parquet",
        lambda c, s: _truncate(c),
        "ingest",
        ("landing file", "cannot be read", "it is not a parquet file, or it was cut short"),
    ),
    Case(
        "empty_parquet",
        lambda c, s: _rewrite(c, "video", lambda df: df.iloc[:0]),
        "ingest",
        ("landing file", "vm=video", "has no rows"),
    ),
    Case(
        "zero_byte_csv",
        lambda c, s: _add_file(c, "video", "late.csv", b""),
        "ingest",
        ("landing file", "late.csv", "is empty (0 bytes)"),
    ),
    Case(
        "label_as_text",
        lambda c, s: _rewrite(c, "feed", lambda df: df.assign(click="yes")),
        "ingest",
        ("landing file", "column click", "cannot be cast to int", "'yes'"),
    ),
    Case(
        "conflicting_duplicate_labels",  # 5% of search's requests logged again with the other label
        lambda c, s: _conflicting_copy(c, "search"),
        "ingest",
        ("VM search", "column click", "logged more than once with different labels", "e.g. request_id r"),
    ),
    Case("unknown_vm", lambda c, s: _unknown_vm(c), "ingest", ("VMs ['shopping']", "not in the registry")),
    # the vm_traffic suite stops what is readable but wrong for the day
    Case(
        "event_ts_from_another_day",
        lambda c, s: _rewrite(
            c, "feed", lambda df: df.assign(event_ts=df["event_ts"] - pd.Timedelta(days=1))
        ),
        "validate vm_traffic",
        ("table vm_traffic", "column event_ts", "expect_column_values_to_be_between", "rows unexpected"),
    ),
    Case(
        "feature_out_of_range",
        lambda c, s: _rewrite(c, "feed", lambda df: df.assign(ad_quality=7.5)),
        "validate vm_traffic",
        ("table vm_traffic", "column ad_quality", "expect_column_values_to_be_between", "[7.5"),
    ),
    Case(
        "ten_times_the_rows",
        lambda c, s: _every_vm(c, _ten_x),
        "validate vm_traffic",
        ("table vm_traffic", "all rows", "expect_table_row_count_to_be_between", "observed "),
    ),
    Case(
        "ten_times_fewer_rows",
        lambda c, s: _every_vm(c, lambda df: df.iloc[::10]),
        "validate vm_traffic",
        ("table vm_traffic", "all rows", "expect_table_row_count_to_be_between", "observed "),
    ),
    Case(
        "ctr_jump",
        lambda c, s: _every_vm(c, lambda df: df.assign(click=np.where(_every(df, 3), 1, df["click"]))),
        "validate vm_traffic",
        ("table vm_traffic", "column click", "expect_column_mean_to_be_between", "observed 0."),
    ),
    Case(
        "user_ids_re_keyed",  # an export that wrote user_id as integers of a remapped id space
        lambda c, s: _every_vm(c, _re_key_users),
        "validate vm_traffic",
        ("table vm_traffic", "column user_id_seen", "expect_column_mean_to_be_between", "observed 0"),
    ),
    Case(
        "one_vm_re_keyed",  # only search's export re-keyed: the day's share drops by a third, search's to 0
        lambda c, s: _rewrite(c, "search", _re_key_users, every_file=True),
        "validate vm_traffic",
        ("table vm_traffic", "column user_id_seen", "rows of VM search", "observed 0"),
    ),
    Case(
        "one_vm_ctr_jumps",  # feed's CTR 2.6x, the day's pooled CTR 1.5x (inside its band)
        lambda c, s: _rewrite(
            c,
            "feed",
            lambda df: df.assign(click=np.where(_every(df, 12), 1, df["click"])),
            every_file=True,
        ),
        "validate vm_traffic",
        ("table vm_traffic", "column click", "expect_column_mean_to_be_between", "(rows of VM feed)"),
    ),
    Case(
        "label_2_from_a_job",
        lambda c, s: _stage(
            s,
            c,
            VM_TRAFFIC,
            lambda df: df.withColumn("click", F.when(df.request_id.endswith("7"), 2).otherwise(df.click)),
        ),
        "validate vm_traffic",
        ("table vm_traffic", "column click", "expect_column_values_to_be_in_set", "[2"),
    ),
    Case(
        "duplicated_request_ids_from_a_job",
        lambda c, s: _stage(s, c, VM_TRAFFIC, lambda df: df.unionByName(df.where("vm = 'feed'").limit(5))),
        "validate vm_traffic",
        (
            "table vm_traffic",
            "columns ds, vm, request_id",
            "expect_compound_columns_to_be_unique",
            "observed 10",
        ),
    ),
    # the fm_dataset suite
    Case(
        "fm_dataset_lost_requests",
        lambda c, s: _stage(s, c, FM_DATASET, lambda df: df.where(~df.request_id.endswith("3"))),
        "validate fm_dataset",
        ("table fm_dataset", "all rows", "expect_table_row_count_to_equal", "observed "),
    ),
    Case(
        "fm_dataset_lost_a_vm_feature",
        lambda c, s: _stage(
            s, c, FM_DATASET, lambda df: df.withColumn("watch_time", F.lit(None).cast("double"))
        ),
        "validate fm_dataset",
        (
            "table fm_dataset",
            "column watch_time",
            "expect_column_proportion_of_non_null_values",
            "observed 0",
        ),
    ),
    # the teacher_scores suite (vm_training)
    Case(
        "teacher_score_outside_0_1_or_null",
        lambda c, s: _stage(
            s,
            c,
            VM_TRAINING,
            lambda df: df.withColumn(
                "teacher_score",
                F.when(df.request_id.endswith("1"), 1.5)
                .when(df.request_id.endswith("2"), None)
                .otherwise(df.teacher_score),
            ),
        ),
        "validate vm_training",
        ("table vm_training", "column teacher_score", "expect_column_values_to_not_be_null", "[1.5"),
    ),
    Case(
        "miscalibrated_teacher",
        lambda c, s: _stage(s, c, VM_TRAINING, lambda df: df.withColumn("teacher_score", F.lit(0.9))),
        "validate vm_training",
        ("table vm_training", "column teacher_score", "expect_column_mean_to_be_between", "observed 0.9"),
    ),
    Case(
        "leaking_teacher_snapshot",
        lambda c, s: _leaking_teacher(s, c),
        "validate vm_training",
        (
            "table vm_training",
            "column teacher_snapshot_id",
            "expect_column_values_to_be_in_set",
            "fm-2026-01-01-",
        ),
        day=D1,
    ),
]


@pytest.fixture
def restore_landing(world):
    yield
    shutil.rmtree(_landing(world.cfg, D2))
    shutil.copytree(world.root / "pristine", _landing(world.cfg, D2))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_stopped_by_the_right_step_and_nothing_is_lost(spark, world, case, restore_landing):
    cfg = world.cfg
    before = _state(spark, cfg)
    step, message = _pipeline(case.day, cfg, spark, case.mutate(cfg, spark))
    assert step == case.step, message
    for fragment in case.expect:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert _state(spark, cfg) == before  # no published table got a commit, downstream ones neither
    if step.startswith("validate"):
        table = step.split()[1]
        (row,) = _dq_rows(spark, cfg, case.day, table)
        assert not row.success and any(case.expect[1] in rule for rule in row.failed_rules), row
        # The bad day is kept for inspection, exactly as it was staged.
        kept = spark.read.format("delta").load(row.quarantine)
        assert row.quarantine in message and kept.count() == row.rows > 0
        assert checksum(kept) == checksum(quality.staged_day(spark, cfg, table, case.day))


def test_cli_validate_exits_1_naming_the_rule_and_0_when_good(spark, world, capsys):
    cfg = world.cfg
    args = ["--config", str(REPO / "exfm.yaml")]
    for item in [*TINY, f"lakehouse_root={cfg.lakehouse_root}", f"landing_root={cfg.landing_root}"]:
        args += ["--set", item]
    _stage(spark, cfg, VM_TRAFFIC, lambda df: df.withColumn("user_id", F.lit(None).cast("string")))
    with pytest.raises(SystemExit) as e:
        main(["validate", "--table", "vm_traffic", "--ds", str(D2), *args])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "table vm_traffic, column user_id: expect_column_values_to_not_be_null" in err, err

    quality.stage(read_day(spark, cfg, VM_TRAFFIC, D2), cfg, VM_TRAFFIC, D2)  # the good day again
    assert main(["validate", "--table", "vm_traffic", "--ds", str(D2), *args]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["success"]


def test_previous_good_days_are_unchanged_after_the_corpus(spark, world):
    for (table, day), good in world.good.items():
        assert checksum(read_day(spark, world.cfg, table, day)) == good, (table, day)


# --- vm_eval ---------------------------------------------------------------------------------
EVAL_SCHEMA = (
    "ds string, vm string, method string, n long, ne double, auc double, logloss double, calibration double"
)


def test_vm_eval_gate(spark, world):
    cfg = world.cfg
    good = [(str(D2), "feed", m, 600, 0.95, 0.71, 0.18, 1.02) for m in ("none", "ah_sa")]
    quality.stage(spark.createDataFrame(good, EVAL_SCHEMA), cfg, VM_EVAL, D2)
    assert quality.run(VM_EVAL, D2, cfg, spark)["success"]
    version = table_version(cfg, VM_EVAL)

    bad = [
        (str(D2), "feed", "none", 600, -0.1, 0.71, 0.18, 1.02),
        (str(D2), "feed", "ah_sa", 600, 0.9, 1.3, float("nan"), 1.0),
    ]
    quality.stage(spark.createDataFrame(bad, EVAL_SCHEMA), cfg, VM_EVAL, D2)
    with pytest.raises(QualityError) as e:
        quality.run(VM_EVAL, D2, cfg, spark)
    message = str(e.value)
    for fragment in (
        "table vm_eval, column ne",
        "table vm_eval, column auc",
        "table vm_eval, column logloss",
    ):
        assert fragment in message, message
    assert table_version(cfg, VM_EVAL) == version
    assert sorted(r.ne for r in read_day(spark, cfg, VM_EVAL, D2).collect()) == [0.95, 0.95]
