"""The ``exfm`` command line: every pipeline step for one day, runnable without Airflow."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time

from jobs.config import ConfigError, ExfmConfig, load_config, parse_ds

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


def cmd_demo(cfg: ExfmConfig, args) -> None:
    """Generate synthetic days and run the pipeline on each, with a summary line per day."""
    from jobs import das, fm_dataset, generate, ingest, publishing, train_fm
    from jobs.spark import build_spark

    spark = build_spark(cfg)
    print(f"lakehouse: {cfg.lakehouse_root} (landing: {cfg.landing_root})")
    for day in _days(cfg, args):
        t0 = time.perf_counter()
        generate.run(day, cfg)
        traffic = ingest.run(day, cfg, spark)
        fm = fm_dataset.run(day, cfg, spark)
        try:  # paper §3.1: the FM trained through day t-1 scores day t
            out = das.run(day, cfg, spark)
            scored = f"{out['requests_scored']} requests scored by {out['snapshot_id']}"
        except publishing.NoSnapshotError:
            scored = "no FM yet" if not publishing.list_snapshots(cfg, spark) else "no eligible FM snapshot"
        teacher = train_fm.run(day, cfg, spark)
        publishing.update_pointer(cfg, spark)
        vms = "  ".join(
            f"{vm}={n} rows ctr={traffic['ctr'].get(vm, float('nan')):.3f}"
            for vm, n in traffic["rows"].items()
        )
        print(
            f"{day}  vm_traffic: {vms}  dup_dropped={sum(traffic['duplicates_dropped'].values())}"
            f"  |  fm_dataset: {fm['rows']} requests ({fm['shared_requests']} seen by >1 VM)"
            f"  |  DAS: {scored}"
            f"  |  FM trained: loss {teacher['train_loss']:.4f}, {teacher['published']['status']}"
            f"  |  {time.perf_counter() - t0:.1f}s",
            flush=True,
        )


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
    sp = sub.add_parser("snapshots", parents=[common], help="list FM snapshots and the pointer")
    sp.set_defaults(func=cmd_snapshots)
    sp = sub.add_parser(
        "demo", parents=[common], help="synthetic days through the whole pipeline, with a summary per day"
    )
    day_range(sp)
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as e:
        print(f"exfm: {e}", file=sys.stderr)
        return 2
    args.func(cfg, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
