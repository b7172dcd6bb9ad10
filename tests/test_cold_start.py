"""A first FM that blessing rejects: the VMs cold-start, and only blessed snapshots ever teach."""

import datetime as dt

import pytest
import torch

from jobs import das, evaluate, publishing, quality, snapshots, train_fm, train_vm
from jobs.lakehouse import VM_EVAL, VM_TRAINING, read_day
from tests.conftest import land_days, tiny_config

DAYS = [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(3)]


def _evals(spark, cfg, day) -> dict:
    evaluate.run(day, cfg, spark)
    return {(r.vm, r.method): r for r in quality.staged_day(spark, cfg, VM_EVAL, day).collect()}


def test_a_rejected_first_fm_means_a_cold_start_and_never_scores(spark, tmp_path):
    cfg = tiny_config(tmp_path)
    land_days(DAYS, cfg, spark)
    # Day 1's FM is broken (all weights zero: p = 0.5 everywhere), so blessing rejects it.
    train_fm.run(DAYS[0], cfg, spark, publish=False)
    uri = snapshots.fm_uri(cfg, DAYS[0])
    good = snapshots.load(uri)
    broken = {**good.state, "model": {k: torch.zeros_like(v) for k, v in good.state["model"].items()}}
    snapshots.save(uri, broken, {k: v for k, v in good.meta.items() if k not in ("sha256", "model_file")})
    rejected = publishing.publish(DAYS[0], cfg, spark)
    assert rejected["status"] == "rejected"

    # Day 2: no eligible teacher, so the DAS has nothing to score with and the VMs cold-start.
    assert publishing.teacher_for_day(DAYS[1], cfg, spark) is None
    with pytest.raises(publishing.NoSnapshotError):
        das.run(DAYS[1], cfg, spark)
    for day in DAYS[:2]:
        for vm in cfg.vms:
            assert train_vm.run(day, vm.name, cfg, spark, method="ah_sa")["cold_start"], (day, vm.name)
    evals = _evals(spark, cfg, DAYS[1])
    # No teacher scored day 2: no `fm` row; the rejected FM's own quality is still reported.
    assert set(evals) == {(vm.name, "ah_sa") for vm in cfg.vms} | {("all", "fm_merged")}
    assert evals[("all", "fm_merged")].teacher_snapshot_id == rejected["snapshot_id"]

    # Day 2's FM, a new chain, is blessed against the base rate (the rejected one is no
    # reference) and teaches day 3.
    blessed = train_fm.run(DAYS[1], cfg, spark, fresh=True)["published"]
    assert blessed["status"] == "blessed"
    publishing.update_pointer(cfg, spark)
    das.run(DAYS[2], cfg, spark)
    quality.run(VM_TRAINING, DAYS[2], cfg, spark)
    ids = {
        r[0]
        for r in read_day(spark, cfg, VM_TRAINING, DAYS[2]).select("teacher_snapshot_id").distinct().collect()
    }
    assert ids == {blessed["snapshot_id"]}
    evals = _evals(spark, cfg, DAYS[2])
    for vm in cfg.vms:
        fm = evals[(vm.name, "fm")]
        assert fm.teacher_snapshot_id == blessed["snapshot_id"] and fm.fm_staleness_days == 0
