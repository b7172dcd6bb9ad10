"""`exfm study`: a tiny study (2 arms x 2 seeds, 2 days) end to end through the jobs and Delta."""

from __future__ import annotations

import os

import pytest
import yaml

from jobs import study
from jobs.config import ConfigError
from jobs.lakehouse import VM_EVAL
from tests.conftest import REPO, TINY


def test_tiny_study_writes_its_results_and_page_and_resumes(spark, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("EXFM__")]:
        monkeypatch.delenv(key)  # the developer's overrides must not change the study
    path = tmp_path / "tiny.yaml"
    feed = {"name": "feed", "categorical": ["user_segment", "ad_category"], "dense": ["ad_quality"]}
    path.write_text(
        yaml.safe_dump(
            {
                "description": "a smaller FM vs the default",
                "days": 2,
                "judge_from": 1,
                "seeds": [1, 2],
                # One VM keeps the test small; a study may override any config field.
                "set": {
                    "vms": [{**feed, "model": "fm", "methods": ["none", "ah_sa"]}],
                    "synthetic.base_ctr": {"feed": 0.05},
                    "quality.dense_ranges": {"ad_quality": [0.0, 1.0]},
                },
                "arms": {"fm_16": {}, "fm_4": {"fm.embed_dim": 4}},
            }
        )
    )
    spec = study.load_study(str(path))
    base = [*TINY, f"lakehouse_root={tmp_path / 'lakehouse'}"]
    out = study.run(spec, str(REPO / "exfm.yaml"), base)
    assert [r["ran"] for r in out["runs"]] == [True] * 4

    results = spark.read.format("delta").load(str(tmp_path / "lakehouse" / study.STUDY_RESULTS))
    rows = [r.asDict() for r in results.where("study = 'tiny'").collect()]
    assert {(r["arm"], r["seed"]) for r in rows} == {(a, s) for a in ("fm_16", "fm_4") for s in (1, 2)}
    assert {r["ds"] for r in rows} == {"2026-01-02"}  # day 1 is judged, day 0 is not
    by = {(r["arm"], r["seed"], r["vm"], r["method"]): r for r in rows}
    for arm in ("fm_16", "fm_4"):
        for seed in (1, 2):
            run_cfg = study.run_config(str(REPO / "exfm.yaml"), base, spec, arm, seed)
            evals = spark.read.format("delta").load(run_cfg.table(VM_EVAL)).where("ds = '2026-01-02'")
            assert {(r.vm, r.method) for r in evals.collect()} == {
                (vm, method) for (a, s, vm, method) in by if (a, s) == (arm, seed)
            }  # the run's own vm_eval, nothing more or less
            none = by[(arm, seed, "feed", "none")]
            for method in ("ah_sa", "fm"):
                r = by[(arm, seed, "feed", method)]
                assert r["ne_gain_pct"] == pytest.approx(100 * (none["ne"] - r["ne"]) / none["ne"])
            assert none["ne_gain_pct"] is None
    # Arms of one seed see the same world: the VMs of day 0 learned without the FM, so they are
    # the same in both arms, while the teacher (the `fm` row: day 0's FM on day 1) is not.
    # Another seed is another world.
    assert by[("fm_16", 1, "feed", "none")]["ne"] == by[("fm_4", 1, "feed", "none")]["ne"]
    assert by[("fm_16", 1, "feed", "fm")]["ne"] != by[("fm_4", 1, "feed", "fm")]["ne"]
    assert by[("fm_16", 1, "feed", "none")]["ne"] != by[("fm_16", 2, "feed", "none")]["ne"]

    page = (tmp_path / "lakehouse" / "reports" / "studies" / "tiny.html").read_text()
    assert "fm_4" in page and "<svg" in page and "ah_sa" in page

    # A second run finds every run done (same overrides) and rewrites the same results.
    again = study.run(spec, str(REPO / "exfm.yaml"), base)
    assert [r["ran"] for r in again["runs"]] == [False] * 4
    assert sorted(map(repr, (r.asDict() for r in results.where("study = 'tiny'").collect()))) == sorted(
        map(repr, rows)
    )


def test_study_files_in_the_repo_are_valid():
    for path in sorted(study.STUDIES_DIR.glob("*.yaml")):
        spec = study.load_study(path.stem)
        for arm in spec.arms:
            study.run_config(None, [], spec, arm, spec.seeds[0])  # every override is a config field
    with pytest.raises(ConfigError, match="not found"):
        study.load_study("no_such_study")
