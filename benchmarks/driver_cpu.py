"""CPU of one Spark driver landing tiny worlds: where the suite's (CPU-bound) time goes.

    ./exfm python benchmarks/driver_cpu.py [--worlds 3] [--set spark.quick_jit=true ...]
    ./exfm python benchmarks/driver_cpu.py --worlds 5 --set 'spark.java_options=[]'  # the JVM's defaults

Builds one local driver (the tests' tiny config plus the overrides), then lands ``--worlds``
worlds of two tiny days each in it (generate, ingest, gate, FM dataset, gate: the tests'
``land_days``), and prints the CPU seconds of this process and its children (the driver's JVM and
its Python workers) per world: the first world pays the JVM's warm-up, the later ones show a warm
driver, whose CPU per step and day is printed too (``warm_cpu_s_per_day``). Compare settings
(or commits) by running it once per setting, with nothing else running.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import land_days, tiny_config  # noqa: E402

DAYS = ["2026-01-01", "2026-01-02"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    seen: dict[int, float] = {}

    def cpu() -> float:
        """CPU seconds of this process and its descendants (from /proc, Linux); a process that
        ended keeps the last CPU seen of it."""
        stats = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # after the ")" of the command: state, ppid, ..., utime stime cutime cstime (13-16)
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(stat.parent.name)] = int(fields[1]), sum(map(int, fields[11:15]))
        family = {os.getpid()}
        while grown := {pid for pid, (ppid, _) in stats.items() if ppid in family} - family:
            family |= grown
        for pid in family:
            seen[pid] = stats[pid][1] / os.sysconf("SC_CLK_TCK")
        return sum(seen.values())

    from jobs import fm_dataset, generate, ingest, quality
    from jobs.spark import build_spark

    # CPU per step of land_days, summed over the warm worlds (every world after the first).
    steps: dict[str, float] = {}
    warm = False

    def counted(name_of, fn):
        def step(*a, **kw):
            c = cpu()
            try:
                return fn(*a, **kw)
            finally:
                if warm:
                    name = name_of(*a)
                    steps[name] = steps.get(name, 0.0) + cpu() - c

        return step

    generate.run = counted(lambda *a: "generate", generate.run)
    ingest.run = counted(lambda *a: "ingest", ingest.run)
    quality.run = counted(lambda table, *a: f"gate {table}", quality.run)
    fm_dataset.run = counted(lambda *a: "fm_dataset", fm_dataset.run)

    root = Path(tempfile.mkdtemp(prefix="exfm-driver-cpu-"))
    t0 = time.monotonic()
    spark = build_spark(tiny_config(root, *args.overrides))
    start = {"wall_s": round(time.monotonic() - t0, 1), "cpu_s": round(cpu(), 1)}
    out = {"overrides": args.overrides, "start": start, "worlds": []}
    for w in range(args.worlds):
        warm = w > 0
        t, c = time.monotonic(), cpu()
        land_days(DAYS, tiny_config(root / f"world{w}", *args.overrides), spark)
        out["worlds"].append({"wall_s": round(time.monotonic() - t, 1), "cpu_s": round(cpu() - c, 1)})
    days = (args.worlds - 1) * len(DAYS)
    out["warm_cpu_s_per_day"] = {k: round(v / days, 2) for k, v in steps.items()} if days else {}
    print(json.dumps(out))
    spark.stop()


if __name__ == "__main__":
    main()
