"""The ``exfm`` command line: every pipeline step for one day, runnable without Airflow."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time

from jobs.config import ENV_PREFIX, ConfigError, DataError, ExfmConfig, load_config, parse_ds

log = logging.getLogger("exfm")


def _days(cfg: ExfmConfig, args) -> list[dt.date]:
    if args.ds:
        return [parse_ds(args.ds)]
    start = parse_ds(args.start) if args.start else cfg.synthetic.start_date
    n = args.days or cfg.synthetic.days
    return [start + dt.timedelta(days=i) for i in range(n)]


def cmd_generate(cfg: ExfmConfig, args) -> None:
    from jobs import generate

    for day in _days(cfg, args):
        _print(generate.run(day, cfg))


def cmd_ingest(cfg: ExfmConfig, args) -> None:
    from jobs import ingest
    from jobs.spark import build_spark

    _print(ingest.run(args.ds, cfg, build_spark(cfg)))


def cmd_build_fm_dataset(cfg: ExfmConfig, args) -> None:
    from jobs import fm_dataset
    from jobs.spark import build_spark

    _print(fm_dataset.run(args.ds, cfg, build_spark(cfg)))


def cmd_validate(cfg: ExfmConfig, args) -> None:
    from jobs import quality
    from jobs.spark import build_spark

    _print(quality.run(args.table, args.ds, cfg, build_spark(cfg)))


def cmd_train_fm(cfg: ExfmConfig, args) -> None:
    from jobs import train_fm
    from jobs.spark import build_spark

    _print(train_fm.run(args.ds, cfg, build_spark(cfg), fresh=args.fresh))


def cmd_train_vm(cfg: ExfmConfig, args) -> None:
    from jobs import train_vm
    from jobs.spark import build_spark

    _print(train_vm.run(args.ds, args.vm, cfg, build_spark(cfg), method=args.method, fresh=args.fresh))


def cmd_publish(cfg: ExfmConfig, args) -> None:
    from jobs import publishing
    from jobs.spark import build_spark

    _print(publishing.publish(args.ds, cfg, build_spark(cfg)))


def cmd_update_pointer(cfg: ExfmConfig, args) -> None:
    from jobs import publishing
    from jobs.spark import build_spark

    _print(publishing.update_pointer(cfg, build_spark(cfg)))


def cmd_gc_snapshots(cfg: ExfmConfig, args) -> None:
    from jobs import publishing
    from jobs.spark import build_spark

    _print(publishing.gc_snapshots(cfg, build_spark(cfg)))


def cmd_das_score(cfg: ExfmConfig, args) -> None:
    from jobs import das
    from jobs.spark import build_spark

    _print(
        das.run(args.ds, cfg, build_spark(cfg), freeze_days=args.freeze_days, snapshot_id=args.snapshot_id)
    )


def cmd_teacher_freshness(cfg: ExfmConfig, args) -> None:
    from jobs import freshness
    from jobs.spark import build_spark

    _print(freshness.run(args.ds, cfg, build_spark(cfg)))


def cmd_evaluate(cfg: ExfmConfig, args) -> None:
    from jobs import evaluate
    from jobs.spark import build_spark

    _print(evaluate.run(args.ds, cfg, build_spark(cfg)))


def cmd_report(cfg: ExfmConfig, args) -> None:
    from jobs import report
    from jobs.spark import build_spark

    _print(report.run(args.ds, cfg, build_spark(cfg)))


def cmd_snapshots(cfg: ExfmConfig, args) -> None:
    """A table of the FM snapshots, newest first; * marks the one the pointer holds."""
    from jobs import publishing
    from jobs.spark import build_spark

    spark = build_spark(cfg)
    pointer = publishing.read_pointer(cfg, spark)
    held = pointer.snapshot_id if pointer else None
    print(f"{'':2}{'snapshot_id':<32}{'through':<12}{'status':<10}{'holdout_ne':>11}{'ref_ne':>9}  files")
    for r in publishing.list_snapshots(cfg, spark):
        ne = "" if r.holdout_ne is None else f"{r.holdout_ne:.4f}"
        ref = "" if r.reference_ne is None else f"{r.reference_ne:.4f}"
        files = f"deleted {r.collected_at:%Y-%m-%d %H:%M}" if r.collected_at else r.uri
        mark = "*" if r.snapshot_id == held else ""
        print(f"{mark:2}{r.snapshot_id:<32}{r.trained_through_ds:<12}{r.status:<10}{ne:>11}{ref:>9}  {files}")
    if pointer:
        print(f"pointer {cfg.das.pointer}: {held}, lease until {pointer.lease_expires_at:%Y-%m-%d %H:%M} UTC")


def cmd_maintenance(cfg: ExfmConfig, args) -> None:
    from jobs import maintenance
    from jobs.spark import build_spark

    _print(maintenance.run(args.ds, cfg, build_spark(cfg), dry_run=args.dry_run, steps=args.step))


def cmd_lineage(cfg: ExfmConfig, args) -> None:
    """What data made a VM snapshot: its rows, its teacher, the teacher's rows (table versions)."""
    from jobs import lineage
    from jobs.spark import build_spark

    _print(lineage.run(cfg, build_spark(cfg), vm=args.vm, method=args.method, ds=args.ds))


def cmd_demo(cfg: ExfmConfig, args) -> None:
    """Synthetic days through the exfm_daily DAG in Airflow (dag.test per day), then the report."""
    import os
    import subprocess
    from collections import Counter
    from pathlib import Path

    from jobs import generate

    days = _days(cfg, args)
    for day in days:
        generate.run(day, cfg)
    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("AIRFLOW_HOME", str(root / ".airflow"))
    os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(root / "dags"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    # The DAG's tasks load the config themselves: hand them this one through the environment.
    if args.config:
        os.environ["EXFM_CONFIG"] = str(Path(args.config).resolve())
    for item in args.set:
        key, _, value = item.partition("=")
        os.environ[ENV_PREFIX + key.strip().upper().replace(".", "__")] = value
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], check=True, stdout=subprocess.DEVNULL)

    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("exfm_daily")
    lines, failed = [], False
    for day in days:
        t0 = time.perf_counter()
        run = dag.test(logical_date=pendulum.datetime(day.year, day.month, day.day, tz="UTC"))
        tis = run.get_task_instances()
        states = Counter(str(ti.state) for ti in tis)
        failed |= str(run.state) != "success"
        lines.append(
            f"{day}  exfm_daily: {run.state} ({', '.join(f'{n} {s}' for s, n in sorted(states.items()))})"
            f"  {_gains(cfg, day)}  {time.perf_counter() - t0:.0f}s"
        )
        if args.tasks:  # where the day's time went, in task order
            for ti in sorted(tis, key=lambda ti: (ti.start_date is None, ti.start_date)):
                mapped = f"[{ti.rendered_map_index or ti.map_index}]" if ti.map_index >= 0 else ""
                name = ti.task_id + mapped
                seconds = "-" if ti.duration is None else f"{ti.duration:.1f}s"
                lines.append(f"    {name:36} {str(ti.state):8} {seconds:>8}")
    print("\n".join(["", *lines, f"report: {cfg.table('reports')}/index.html"]), flush=True)
    if failed:
        raise SystemExit("exfm demo: a day failed; its task logs are above")


def cmd_study(cfg: ExfmConfig, args) -> None:
    """A study of studies/<name>.yaml: every (arm, seed) through the jobs, then study_results and a page."""
    from jobs import study

    spec = study.load_study(args.name)
    if args.seeds:
        spec = spec.model_copy(update={"seeds": tuple(args.seeds)})
    out = study.run(spec, args.config, args.set, workers=args.workers)
    print(out.pop("summary"), flush=True)
    _print(out)


def _gains(cfg: ExfmConfig, day: dt.date) -> str:
    """Next-day NE gain of each method over `none`, averaged over the VMs (from vm_eval)."""
    from jobs import report
    from jobs.lakehouse import VM_EVAL, read_day, table_version
    from jobs.spark import build_spark

    spark = build_spark(cfg)
    if table_version(cfg, VM_EVAL) is None:
        return "NE gain vs none: -"
    gains: dict[str, list[float]] = {}
    for (_, method), gain in report.ne_gains(
        [r.asDict() for r in read_day(spark, cfg, VM_EVAL, day).collect()]
    ).items():
        if method != "none":
            gains.setdefault(method, []).append(gain)
    return "NE gain vs none: " + (
        ", ".join(f"{m} {sum(g) / len(g):+.2f}%" for m, g in sorted(gains.items())) or "-"
    )


def cmd_spark_server(cfg: ExfmConfig, args) -> None:
    from jobs.spark import serve

    serve(cfg, port=args.port, host=args.host)


def _print(result: dict) -> None:
    print(json.dumps(result, default=str), flush=True)


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML config (default: $EXFM_CONFIG or exfm.yaml)")
    common.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set spark.master=local[2] (repeatable)",
    )
    p = argparse.ArgumentParser(prog="exfm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def day_range(sp):
        sp.add_argument("--ds", help="one day YYYY-MM-DD")
        sp.add_argument("--start", help="first day (default synthetic.start_date)")
        sp.add_argument("--days", type=int, help="number of days (default synthetic.days)")

    sp = sub.add_parser(
        "generate", parents=[common], help="write synthetic landing files and true click probabilities"
    )
    day_range(sp)
    sp.set_defaults(func=cmd_generate)
    sp = sub.add_parser("ingest", parents=[common], help="landing files of a day -> Delta vm_traffic")
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_ingest)
    sp = sub.add_parser("build-fm-dataset", parents=[common], help="vm_traffic of a day -> Delta fm_dataset")
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_build_fm_dataset)
    sp = sub.add_parser(
        "validate", parents=[common], help="data-quality gate: GX suite on the staged day, then publish"
    )
    sp.add_argument("--table", required=True, choices=("vm_traffic", "fm_dataset", "vm_training", "vm_eval"))
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_validate)
    sp = sub.add_parser("train-fm", parents=[common], help="one pass of the FM over fm_dataset[ds]")
    sp.add_argument("--ds", required=True)
    sp.add_argument("--fresh", action="store_true", help="start from scratch instead of the FM of ds-1")
    sp.set_defaults(func=cmd_train_fm)
    sp = sub.add_parser("train-vm", parents=[common], help="one pass of a VM over vm_training[ds, vm]")
    sp.add_argument("--ds", required=True)
    sp.add_argument("--vm", required=True)
    sp.add_argument("--method", choices=("none", "kd", "ah", "ah_sa"), help="default: vm_training.method")
    sp.add_argument("--fresh", action="store_true", help="start from scratch instead of the VM of ds-1")
    sp.set_defaults(func=cmd_train_vm)
    sp = sub.add_parser("publish", parents=[common], help="register the FM snapshot of ds (after blessing)")
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_publish)
    sp = sub.add_parser(
        "update-pointer", parents=[common], help="move fm_pointer to the newest eligible snapshot"
    )
    sp.set_defaults(func=cmd_update_pointer)
    sp = sub.add_parser("gc-snapshots", parents=[common], help="delete files of expired, unheld snapshots")
    sp.set_defaults(func=cmd_gc_snapshots)
    sp = sub.add_parser(
        "das-score", parents=[common], help="FM teacher scores for vm_traffic[ds] -> vm_training"
    )
    sp.add_argument("--ds", required=True)
    sp.add_argument(
        "--freeze-days", type=int, help="use an FM this many days staler (default das.freeze_days)"
    )
    sp.add_argument("--snapshot-id", help="score with this snapshot instead of resolving one")
    sp.set_defaults(func=cmd_das_score)
    sp = sub.add_parser(
        "teacher-freshness", parents=[common], help="staleness alarm: exit 1 if ds's FM teacher is too old"
    )
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_teacher_freshness)
    sp = sub.add_parser(
        "evaluate", parents=[common], help="the VM and FM snapshots of ds-1 on vm_traffic[ds] -> vm_eval"
    )
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_evaluate)
    sp = sub.add_parser("report", parents=[common], help="HTML report of ds (and the index of all days)")
    sp.add_argument("--ds", required=True)
    sp.set_defaults(func=cmd_report)
    sp = sub.add_parser(
        "spark-server",
        parents=[common],
        help="a Spark Connect server with Delta, in the foreground (jobs use it with spark.remote)",
    )
    sp.add_argument("--port", type=int, default=15002)
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    sp.set_defaults(func=cmd_spark_server)
    sp = sub.add_parser("snapshots", parents=[common], help="list FM snapshots and the pointer")
    sp.set_defaults(func=cmd_snapshots)
    sp = sub.add_parser(
        "maintenance", parents=[common], help="OPTIMIZE/VACUUM, retention, snapshot GC (exfm_maintenance)"
    )
    sp.add_argument("--ds", required=True, help="the maintenance day: retention counts back from it")
    sp.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    sp.add_argument("--step", action="append", help="only these steps (repeatable; default all)")
    sp.set_defaults(func=cmd_maintenance)
    sp = sub.add_parser(
        "lineage", parents=[common], help="what data made a VM snapshot: VM -> teacher FM -> table versions"
    )
    sp.add_argument("--vm", required=True)
    sp.add_argument("--method", required=True)
    sp.add_argument("--ds", required=True, help="the day the snapshot was trained through")
    sp.set_defaults(func=cmd_lineage)
    sp = sub.add_parser(
        "demo", parents=[common], help="synthetic days through the exfm_daily DAG (Airflow), then the report"
    )
    day_range(sp)
    sp.add_argument("--tasks", action="store_true", help="also print each task's state and wall time")
    sp.set_defaults(func=cmd_demo)
    sp = sub.add_parser(
        "study", parents=[common], help="run a study (studies/NAME.yaml) end to end: study_results and a page"
    )
    sp.add_argument("name", help="a study in studies/ (or a path to a study file)")
    sp.add_argument("--workers", type=int, default=1, help="runs at a time, each its own process and Spark")
    sp.add_argument("--seeds", type=int, nargs="+", help="instead of the study's seeds")
    sp.set_defaults(func=cmd_study)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("py4j", "great_expectations"):  # the job's own lines first; theirs at WARN
        logging.getLogger(chatty).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as e:
        print(f"exfm: {e}", file=sys.stderr)
        return 2
    try:
        args.func(cfg, args)
    except ConfigError as e:  # e.g. a study file that does not exist or does not validate
        print(f"exfm: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # the message names the table or file, the column and the rule
        print(f"exfm {args.command}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
