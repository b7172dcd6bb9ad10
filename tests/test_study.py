"""`exfm study`: a tiny study (2 arms x 2 seeds, 3 days) end to end through the jobs and Delta."""

from __future__ import annotations

import os

import pytest
import yaml

from jobs import snapshots, study
from jobs.config import ConfigError
from jobs.lakehouse import FM_SNAPSHOTS, VM_EVAL
from tests.conftest import REPO, TINY


def test_tiny_study_writes_its_results_and_page_and_resumes(spark, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("EXFM__")]:
        monkeypatch.delenv(key)  # the developer's overrides must not change the study
    path = tmp_path / "tiny.yaml"
    feed = {"name": "feed", "categorical": ["user_segment", "ad_category"], "dense": ["ad_quality"]}
    arms = {"w_1": {}, "w_3": {"vm_training.w": 3.0}}
    path.write_text(
        yaml.safe_dump(
            {
                "description": "the distillation loss weighted 3x",
                "days": 3,
                "judge_from": 2,  # day 0 has no teacher, so day 1's VMs are the first taught
                "seeds": [1, 2],
                # One VM keeps the test small; a study may override any config field.
                "set": {
                    "vms": [{**feed, "model": "fm", "methods": ["none", "ah_sa"]}],
                    "synthetic.base_ctr": {"feed": 0.05},
                    "quality.dense_ranges": {"ad_quality": [0.0, 1.0]},
                },
                "arms": arms,
            }
        )
    )
    spec = study.load_study(str(path))
    cfg_path, base = str(REPO / "exfm.yaml"), [*TINY, f"lakehouse_root={tmp_path / 'lakehouse'}"]
    out = study.run(spec, cfg_path, base)
    # w_3 changes only what the VMs' training reads: it starts from a copy of w_1's run.
    assert [(r["arm"], r["start"], r["ran"]) for r in out["runs"]] == [
        ("w_1", "data", True),
        ("w_3", "vm", True),
    ] * 2

    results = spark.read.format("delta").load(str(tmp_path / "lakehouse" / study.STUDY_RESULTS))
    rows = [r.asDict() for r in results.where("study = 'tiny'").collect()]
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in arms for s in (1, 2)}
    assert {r["ds"] for r in rows} == {"2026-01-03"}  # day 2 is judged, days 0-1 are not
    by = {(r["arm"], r["seed"], r["vm"], r["method"]): r for r in rows}
    for arm in arms:
        for seed in (1, 2):
            run_cfg = study.run_config(cfg_path, base, spec, arm, seed)
            evals = spark.read.format("delta").load(run_cfg.table(VM_EVAL)).where("ds = '2026-01-03'")
            assert {(r.vm, r.method) for r in evals.collect()} == {
                (vm, method) for (a, s, vm, method) in by if (a, s) == (arm, seed)
            }  # the run's own vm_eval, nothing more or less
            none = by[(arm, seed, "feed", "none")]
            for method in ("ah_sa", "fm"):
                r = by[(arm, seed, "feed", method)]
                assert r["ne_gain_pct"] == pytest.approx(100 * (none["ne"] - r["ne"]) / none["ne"])
            assert none["ne_gain_pct"] is None
    # Arms of one seed see the same world and the same teacher; only the taught VM differs.
    # Another seed is another world.
    for method in ("none", "fm"):
        assert by[("w_1", 1, "feed", method)]["ne"] == by[("w_3", 1, "feed", method)]["ne"]
    assert by[("w_1", 1, "feed", "ah_sa")]["ne"] != by[("w_3", 1, "feed", "ah_sa")]["ne"]
    assert by[("w_1", 1, "feed", "none")]["ne"] != by[("w_1", 2, "feed", "none")]["ne"]

    # The copy is w_3's own: its FM snapshots are recorded at its own files.
    shared = study.run_config(cfg_path, base, spec, "w_3", 1)
    uris = [r.uri for r in spark.read.format("delta").load(shared.table(FM_SNAPSHOTS)).collect()]
    assert len(uris) == 3 and all(
        u.startswith(f"{shared.snapshots}/fm/") and snapshots.exists(u) for u in uris
    )
    # ... and gives what running w_3 alone gives, day by day.
    alone_spec = spec.model_copy(update={"name": "tiny_alone", "arms": {"w_3": arms["w_3"]}, "seeds": (1,)})
    assert study._run_one(cfg_path, base, alone_spec, "w_3", 1, threads=2)["start"] == "data"
    alone = study.run_config(cfg_path, base, alone_spec, "w_3", 1)

    def evals(run_cfg):
        table = spark.read.format("delta").load(run_cfg.table(VM_EVAL))
        return {(r.ds, r.vm, r.method): (r.n, r.ne, r.calibration) for r in table.collect()}

    assert (
        evals(shared) == evals(alone) and len(evals(alone)) == 2 * 4
    )  # days 1-2 x none, ah_sa, fm, fm_merged

    page = (tmp_path / "lakehouse" / "reports" / "studies" / "tiny.html").read_text()
    assert "w_3" in page and "<svg" in page and "ah_sa" in page

    # A second run finds every run done (same overrides) and rewrites the same results.
    again = study.run(spec, cfg_path, base)
    assert [r["ran"] for r in again["runs"]] == [False] * 4
    assert sorted(map(repr, (r.asDict() for r in results.where("study = 'tiny'").collect()))) == sorted(
        map(repr, rows)
    )


def test_arms_start_from_the_first_arm_at_the_first_stage_they_change():
    starts = {
        name: {arm: spec.base_arm(arm) for arm in spec.arms}
        for name, spec in ((n, study.load_study(n)) for n in ("knobs", "staleness", "methods", "control"))
    }
    assert starts["knobs"] == {
        "w1_a1_b1": (None, "data"),
        **{a: ("w1_a1_b1", "vm") for a in list(starts["knobs"])[1:]},
    }
    assert set(starts["staleness"].values()) == {(None, "data"), ("fresh", "das")}
    assert starts["methods"]["dcn"] == ("dcnv2", "fm")
    # The control FM reads other traffic (fm.source_vms): a run of its own, even with other fm keys.
    assert starts["control"]["control_feed"] == starts["control"]["control_feed_same_days"] == (None, "data")
    assert study.key_stage("vms") == study.key_stage("synthetic.rows_per_day") == "data"
    assert study.key_stage("das") == "das" and study.key_stage("fm.arch") == "fm"


def test_study_files_in_the_repo_are_valid():
    for path in sorted(study.STUDIES_DIR.glob("*.yaml")):
        spec = study.load_study(path.stem)
        for arm in spec.arms:
            study.run_config(None, [], spec, arm, spec.seeds[0])  # every override is a config field
    with pytest.raises(ConfigError, match="not found"):
        study.load_study("no_such_study")
