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


def cmd_demo(cfg: ExfmConfig, args) -> None:
    """Generate synthetic days and run the pipeline on each, with a summary line per day."""
    from jobs import fm_dataset, generate, ingest, train_fm
    from jobs.spark import build_spark

    spark = build_spark(cfg)
    print(f"lakehouse: {cfg.lakehouse_root} (landing: {cfg.landing_root})")
    for day in _days(cfg, args):
        t0 = time.perf_counter()
        generate.run(day, cfg)
        traffic = ingest.run(day, cfg, spark)
        fm = fm_dataset.run(day, cfg, spark)
        teacher = train_fm.run(day, cfg, spark)
        vms = "  ".join(
            f"{vm}={n} rows ctr={traffic['ctr'].get(vm, float('nan')):.3f}"
            for vm, n in traffic["rows"].items()
        )
        print(
            f"{day}  vm_traffic: {vms}  dup_dropped={sum(traffic['duplicates_dropped'].values())}"
            f"  |  fm_dataset: {fm['rows']} requests ({fm['shared_requests']} seen by >1 VM)"
            f"  |  FM trained: loss {teacher['train_loss']:.4f}"
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
