"""study: one of the paper's studies (§4) run end to end through the pipeline's own jobs.

A study is a YAML file (``studies/<name>.yaml``): the days, the seeds, overrides shared by every
arm, and the arms, each a set of config overrides. Every (arm, seed) is a run: the days of the
daily DAG, in its order, through the same ``jobs.*.run`` and Delta tables, in a lakehouse of its
own (``<lakehouse_root>/studies/<study>/<arm>/seed=<s>``). Seed s seeds both the synthetic world
and training, so the arms of one seed see the same traffic and differ only by their overrides.

The results are the runs' own ``vm_eval`` rows of the judged days, gathered into the Delta table
``study_results`` (one replaceWhere per study) with the NE gain of each method over ``none`` of
the same run, day and VM, and an HTML page (``reports/studies/<study>.html``) with the mean and
standard deviation over seeds and a plot per VM. A finished run is not run again unless its
overrides changed, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.config import ConfigError, ExfmConfig, load_config
from jobs.lakehouse import (
    FM_DATASET,
    FM_POINTER,
    FM_SNAPSHOTS,
    VM_EVAL,
    VM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
    render_sql,
    table_ref,
    table_version,
)

log = logging.getLogger(__name__)

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
STUDY_RESULTS = "study_results"
Overrides = dict[str, object]

STAGES = ("data", "fm", "das", "vm")
# The first stage that reads a config section; a key of any other section changes the data.
_SECTION_STAGE = (("fm.source_vms", "data"), ("fm", "fm"), ("das", "das"), ("vm_training", "vm"))
# What each stage writes, relative to the run's lakehouse (its gates' dq_results rows are
# replaced when the stage runs again).
_STAGE_PATHS = {
    "fm": (FM_SNAPSHOTS, FM_POINTER, "snapshots/fm"),
    "das": (VM_TRAINING, f"_staging/{VM_TRAINING}"),
    "vm": (VM_SNAPSHOTS, "snapshots/vm", VM_EVAL, f"_staging/{VM_EVAL}"),
}


def key_stage(key: str) -> str:
    """The first stage whose steps read the override ``key``."""
    for section, stage in _SECTION_STAGE:
        if key == section or key.startswith(f"{section}."):
            return stage
    return "data"


class StudySpec(BaseModel):
    """A study file, validated on load."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    description: str = ""
    days: int = Field(ge=2)
    judge_from: int = Field(1, ge=1)  # first judged day (0-based index): later than the FM's warm-up
    seeds: tuple[int, ...] = Field(min_length=1)
    # Every VM trains from scratch on each day (the paper's public protocol: a VM is trained on one
    # day with the FM's scores and judged on the next) instead of continuing its chain.
    fresh_vms: bool = False
    set: Overrides = Field(default_factory=dict)  # config overrides of every arm
    arms: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Overrides] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        if self.judge_from >= self.days:
            raise ValueError(f"judge_from {self.judge_from} leaves no judged day of {self.days}")
        return self

    def base_arm(self, arm: str) -> tuple[str | None, str]:
        """(the arm whose run this arm's run starts from, the first stage it runs itself).

        The base is the study's first arm; an arm that changes the data is its own base.
        """
        base = next(iter(self.arms))
        mine, theirs = self.arms[arm], self.arms[base]
        changed = {
            k for k in mine.keys() | theirs.keys() if k not in mine or k not in theirs or mine[k] != theirs[k]
        }
        start = min(map(key_stage, changed), key=STAGES.index, default="vm")
        return (None, "data") if arm == base or start == "data" else (base, start)

    def overrides(self, arm: str, seed: int) -> list[str]:
        """The run's config overrides, as ``--set`` items (values in JSON, which YAML reads)."""
        items = {**self.set, **self.arms[arm], "seeds.synthetic": seed, "seeds.train": seed}
        return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def load_study(name_or_path: str) -> StudySpec:
    path = Path(name_or_path)
    if not path.suffix:
        path = STUDIES_DIR / f"{name_or_path}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))
        raise ConfigError(f"study {name_or_path!r} not found ({path}); studies: {known}") from None
    try:
        return StudySpec.model_validate({"name": path.stem, **raw})
    except ValidationError as e:
        raise ConfigError(f"invalid study {path}:\n{e}") from None


def study_root(cfg: ExfmConfig, spec: StudySpec) -> str:
    return cfg.table(f"studies/{spec.name}")


def run_config(cfg_path: str | None, base: list[str], spec: StudySpec, arm: str, seed: int) -> ExfmConfig:
    """The config of one run: the user's config and overrides, the study's, its own paths."""
    root = f"{study_root(load_config(cfg_path, overrides=base), spec)}/{arm}/seed={seed}"
    paths = [f"lakehouse_root={root}/lakehouse", f"landing_root={root}/landing", f"truth_root={root}/truth"]
    return load_config(cfg_path, overrides=[*base, *spec.overrides(arm, seed), *paths])


def run_days(cfg: ExfmConfig, spark, days: int, *, fresh_vms: bool = False, start: str = "data") -> None:
    """The daily DAG's steps for each day, in its order (dags/exfm_daily.py), in one process.

    ``start`` skips the stages before it: their tables of every day are already there.
    """
    from jobs import das, evaluate, fm_dataset, generate, ingest, publishing, quality, train_fm, train_vm

    runs = set(STAGES[STAGES.index(start) :])
    seconds: dict[str, float] = {}

    def step(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
        return out

    for i in range(days):
        day = cfg.synthetic.start_date + dt.timedelta(days=i)
        seconds.clear()
        if "data" in runs:
            step("generate", generate.run, day, cfg)
            step("ingest", ingest.run, day, cfg, spark)
            step("gate_vm_traffic", quality.run, VM_TRAFFIC, day, cfg, spark)
            step("build_fm_dataset", fm_dataset.run, day, cfg, spark)
            step("gate_fm_dataset", quality.run, FM_DATASET, day, cfg, spark)
        if not publishing.in_fm_warmup(day, cfg, spark):
            # else the VMs cold-start: no teacher for the day
            if "das" in runs and publishing.teacher_for_day(day, cfg, spark) is not None:
                step("das_score", das.run, day, cfg, spark)
                step("gate_vm_training", quality.run, VM_TRAINING, day, cfg, spark)
            for pair in cfg.vm_method_pairs():
                step(
                    "train_vm",
                    train_vm.run,
                    day,
                    pair["vm"],
                    cfg,
                    spark,
                    method=pair["method"],
                    fresh=fresh_vms,
                )
        if step("evaluate", evaluate.run, day, cfg, spark)["rows"]:
            step("gate_vm_eval", quality.run, VM_EVAL, day, cfg, spark)
        if "fm" in runs:
            step("train_fm", train_fm.run, day, cfg, spark)  # trains and publishes (blessing decides)
            step("update_pointer", publishing.update_pointer, cfg, spark)
        log.info(
            "study day %s: %.0fs (%s) in %s",
            day,
            sum(seconds.values()),
            ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()),
            cfg.lakehouse_root,
        )


def _stamp(base: list[str], spec: StudySpec, arm: str, seed: int) -> dict:
    """What a finished run was run with; a run whose stamp changed runs again."""
    stamp = {"overrides": [*base, *spec.overrides(arm, seed)], "days": spec.days, "fresh_vms": spec.fresh_vms}
    source, start = spec.base_arm(arm)
    if source is not None:  # a copy of the base's earlier stages: the base's stamp is part of it
        stamp["from"] = {"arm": source, "start": start, "stamp": _stamp(base, spec, source, seed)}
    return stamp


def copy_run(base_cfg: ExfmConfig, cfg: ExfmConfig, spark, without: tuple[str, ...] = ()) -> None:
    """The base run's files and tables as this run's, without the paths ``without`` (relative to
    its lakehouse).

    Delta tables copy as directories (their logs hold relative paths). The snapshots' recorded
    URIs are moved to this run's copies, so the run does not depend on the base's files.
    """
    src, dst = Path(base_cfg.lakehouse_root).parent, Path(cfg.lakehouse_root).parent
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_done.json"))
    for rel in without:
        shutil.rmtree(Path(cfg.table(rel)), ignore_errors=True)
    for table in (FM_SNAPSHOTS, VM_SNAPSHOTS):
        if table_version(cfg, table) is not None:
            spark.sql(
                render_sql("snapshots_relocate", snapshots=table_ref(cfg, table)),
                args={"old": base_cfg.snapshots, "new": cfg.snapshots},
            )


def _copy_base(base_cfg: ExfmConfig, cfg: ExfmConfig, start: str, spark) -> None:
    """The base run's files and tables, without those of ``start`` and later stages, as this run's."""
    later = STAGES[STAGES.index(start) :]
    copy_run(base_cfg, cfg, spark, without=tuple(p for stage in later for p in _STAGE_PATHS.get(stage, ())))


def _run_one(
    cfg_path: str | None, base: list[str], spec: StudySpec, arm: str, seed: int, threads: int
) -> dict:
    """One (arm, seed) run in this process; skipped if it finished before with the same stamp."""
    import torch

    from jobs.spark import build_spark

    if not logging.getLogger().handlers:  # a spawned worker: log like the CLI does
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = run_config(cfg_path, base, spec, arm, seed)
    root = Path(cfg.lakehouse_root).parent
    done = root / "_done.json"
    stamp = _stamp(base, spec, arm, seed)
    source, start = spec.base_arm(arm)
    status = {"arm": arm, "seed": seed, "start": start}
    if done.exists() and json.loads(done.read_text()) == stamp:
        return {**status, "ran": False}
    shutil.rmtree(root, ignore_errors=True)  # a changed or interrupted run starts over
    torch.set_num_threads(threads)
    spark = build_spark(cfg)
    t0 = time.perf_counter()
    if source is not None:
        base_cfg = run_config(cfg_path, base, spec, source, seed)
        base_done = Path(base_cfg.lakehouse_root).parent / "_done.json"
        if not base_done.exists() or json.loads(base_done.read_text()) != stamp["from"]["stamp"]:
            raise RuntimeError(
                f"study {spec.name}: run {source}/seed={seed} must finish before {arm}/seed={seed}"
            )
        _copy_base(base_cfg, cfg, start, spark)
    log.info("study %s: run %s/seed=%s starts at stage %s in %s", spec.name, arm, seed, start, root)
    run_days(cfg, spark, spec.days, fresh_vms=spec.fresh_vms, start=start)
    done.write_text(json.dumps(stamp))
    return {**status, "ran": True, "seconds": round(time.perf_counter() - t0)}


def run(
    spec: StudySpec, cfg_path: str | None = None, overrides: list[str] | None = None, workers: int = 1
) -> dict:
    """Run every (arm, seed) of the study (``workers`` processes), then gather and render."""
    import concurrent.futures as cf
    import multiprocessing as mp

    base = list(overrides or [])
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    # Each worker is its own Spark driver: share the cores instead of each taking all.
    base_run = [*base, f"spark.master=local[{threads}]"] if workers > 1 else base
    runs = [(arm, seed) for seed in spec.seeds for arm in spec.arms]
    t0 = time.perf_counter()
    if workers == 1:
        statuses = [_run_one(cfg_path, base_run, spec, arm, seed, threads) for arm, seed in runs]
    else:
        # Two waves: the runs that start from another run's copy wait for the first wave.
        waves = [[r for r in runs if (spec.base_arm(r[0])[0] is None) == first] for first in (True, False)]
        statuses = []
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            for wave in waves:
                futures = [pool.submit(_run_one, cfg_path, base_run, spec, a, s, threads) for a, s in wave]
                statuses += [f.result() for f in futures]
    for st in statuses:
        log.info(
            "study %s run %s/seed=%s (from stage %s): %s",
            spec.name,
            st["arm"],
            st["seed"],
            st["start"],
            f"{st['seconds']}s" if st["ran"] else "done before",
        )
    cfg = load_config(cfg_path, overrides=base)
    results = gather(spec, cfg, cfg_path, base_run)
    page = render(spec, cfg, results)
    return {
        "study": spec.name,
        "runs": statuses,
        "rows": len(results),
        "page": page,
        "seconds": round(time.perf_counter() - t0),
        "summary": summary_text(spec, results),
    }


def gather(spec: StudySpec, cfg: ExfmConfig, cfg_path: str | None, base: list[str]) -> list[dict]:
    """The judged vm_eval rows of every run -> ``study_results`` (replaceWhere of the study)."""
    from pyspark.sql import functions as F

    from jobs.lakehouse import partition_predicate
    from jobs.spark import build_spark

    spark = build_spark(cfg)
    rows = []
    for seed in spec.seeds:
        for arm in spec.arms:
            run_cfg = run_config(cfg_path, base, spec, arm, seed)
            if table_version(run_cfg, VM_EVAL) is None:
                continue
            first = (run_cfg.synthetic.start_date + dt.timedelta(days=spec.judge_from)).isoformat()
            evals = spark.read.format("delta").load(run_cfg.table(VM_EVAL)).where(F.col("ds") >= first)
            for r in evals.collect():  # small: (VMs x methods) rows per day
                rows.append({"study": spec.name, "arm": arm, "seed": seed, **_result(r.asDict())})
    _add_gains(rows)
    if rows:
        df = spark.createDataFrame(rows, schema=RESULT_SCHEMA)
        (
            df.write.format("delta")
            .mode("overwrite")
            .option("replaceWhere", partition_predicate(study=spec.name))
            .partitionBy("study")
            .save(cfg.table(STUDY_RESULTS))
        )
    return rows


RESULT_SCHEMA = (
    "study string, arm string, seed int, ds string, vm string, method string, n long, ne double, "
    "auc double, logloss double, calibration double, oracle_ne double, fm_staleness_days int, "
    "ne_gain_pct double"
)
_FIELDS = ("ds", "vm", "method", "n", "ne", "auc", "logloss", "calibration", "oracle_ne", "fm_staleness_days")


def _result(r: dict) -> dict:
    return {k: (str(r[k]) if k == "ds" else r.get(k)) for k in _FIELDS}


def _add_gains(rows: list[dict]) -> None:
    """NE gain of each row over ``none`` of the same run, day and VM, in percent (positive: better)."""
    none = {(r["arm"], r["seed"], r["ds"], r["vm"]): r["ne"] for r in rows if r["method"] == "none"}
    for r in rows:
        base = none.get((r["arm"], r["seed"], r["ds"], r["vm"]))
        r["ne_gain_pct"] = None if base is None or r["method"] == "none" else 100 * (base - r["ne"]) / base


def summarize(rows: list[dict]) -> list[dict]:
    """Per (arm, vm, method): mean and std over seeds of the run's mean over the judged days."""
    import statistics

    per_run: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        acc = per_run.setdefault((r["arm"], r["vm"], r["method"], r["seed"]), {})
        for k in ("ne", "calibration", "ne_gain_pct"):
            if r[k] is not None:
                acc.setdefault(k, []).append(r[k])
    groups: dict[tuple, dict[str, list[float]]] = {}
    for (arm, vm, method, _), acc in per_run.items():
        g = groups.setdefault((arm, vm, method), {})
        for k, values in acc.items():
            g.setdefault(k, []).append(sum(values) / len(values))
    out = []
    for (arm, vm, method), g in groups.items():
        row = {"arm": arm, "vm": vm, "method": method, "seeds": len(g.get("ne", []))}
        for k, values in g.items():
            row[k] = statistics.fmean(values)
            row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


METHOD_ORDER = {m: i for i, m in enumerate(("none", "kd", "ah", "ah_sa", "fm", "fm_merged"))}


def sorted_summary(spec: StudySpec, rows: list[dict]) -> list[dict]:
    arms = list(spec.arms)
    key = lambda r: (r["vm"], arms.index(r["arm"]), METHOD_ORDER.get(r["method"], 99), r["method"])  # noqa: E731
    return sorted(summarize(rows), key=key)


def summary_text(spec: StudySpec, rows: list[dict]) -> str:
    """The page's table as text (mean ± std over seeds), for the terminal and notes."""
    w = max(len(a) for a in spec.arms)
    lines = [f"{'vm':8} {'arm':{w}} {'method':10} {'NE':>17} {'gain vs none %':>16} {'calibration':>14}"]
    for r in sorted_summary(spec, rows):
        gain = f"{r['ne_gain_pct']:+.2f} ± {r['ne_gain_pct_std']:.2f}" if "ne_gain_pct" in r else ""
        lines.append(
            f"{r['vm']:8} {r['arm']:{w}} {r['method']:10} {r['ne']:.4f} ± {r['ne_std']:.4f} {gain:>16} "
            f"{r['calibration']:.3f} ± {r['calibration_std']:.3f}"
        )
    return "\n".join(lines)


def render(spec: StudySpec, cfg: ExfmConfig, rows: list[dict]) -> str:
    """The study's HTML page: a table of means ± std over seeds and, per VM, the gains by arm."""
    from jobs.report import figure, html_page, reports_dir, write_atomic

    summary = sorted_summary(spec, rows)
    arms = list(spec.arms)
    head = "".join(
        f"<th>{h}</th>" for h in ("arm", "vm", "method", "seeds", "NE", "NE gain vs none %", "calibration")
    )
    body = []
    for r in summary:
        gain = "" if "ne_gain_pct" not in r else f"{r['ne_gain_pct']:+.2f} ± {r['ne_gain_pct_std']:.2f}"
        body.append(
            "<tr>"
            + "".join(f"<td class=l>{html.escape(r[k])}</td>" for k in ("arm", "vm", "method"))
            + f"<td>{r['seeds']}</td><td>{r['ne']:.4f} ± {r['ne_std']:.4f}</td><td>{gain}</td>"
            f"<td>{r['calibration']:.3f} ± {r['calibration_std']:.3f}</td></tr>"
        )
    first = cfg.synthetic.start_date + dt.timedelta(days=spec.judge_from)
    parts = [
        f"<h1>Study {html.escape(spec.name)}</h1><p>{html.escape(spec.description)}</p>",
        f"<p>{len(spec.arms)} arms x seeds {list(spec.seeds)}, {spec.days} days, judged from {first}"
        f"{' (every VM trained from scratch each day)' if spec.fresh_vms else ''}. "
        "Mean ± std over seeds of each run's mean over the judged days; the gain is over "
        "<code>none</code> of the same run, day and VM (positive: lower NE).</p>",
        f"<table><tr>{head}</tr>{''.join(body)}</table>",
    ]
    for vm in sorted({r["vm"] for r in summary if "ne_gain_pct" in r}):
        parts.append(
            figure(_gain_plot([r for r in summary if r["vm"] == vm], arms, vm), f"{vm}: gain by arm")
        )
    arms_yaml = yaml.safe_dump({"set": spec.set, "arms": spec.arms}, sort_keys=False)
    parts.append(f"<h2>Arms</h2><pre>{html.escape(arms_yaml)}</pre>")
    out = reports_dir(cfg) / "studies"
    out.mkdir(parents=True, exist_ok=True)
    page = out / f"{spec.name}.html"
    write_atomic(page, html_page(f"exfm study {spec.name}", "".join(parts)))
    return str(page)


def _gain_plot(summary: list[dict], arms: list[str], vm: str) -> str:
    """NE gain over none (mean ± std over seeds) per arm, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jobs.report import svg

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for method in dict.fromkeys(r["method"] for r in summary if "ne_gain_pct" in r):
        points = {r["arm"]: r for r in summary if r["method"] == method and "ne_gain_pct" in r}
        xs = [a for a in arms if a in points]
        ax.errorbar(
            xs,
            [points[a]["ne_gain_pct"] for a in xs],
            yerr=[points[a]["ne_gain_pct_std"] for a in xs],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.axhline(0, color="#999", lw=0.8)
    ax.set_title(f"{vm}: NE gain over none (%)")
    ax.legend(fontsize=8)
    return svg(fig)
