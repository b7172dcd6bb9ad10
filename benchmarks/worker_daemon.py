"""CPU of the DAS's Python workers as they start: Spark's daemon vs jobs.worker_daemon.

    ./exfm python benchmarks/worker_daemon.py                     # the project's daemon
    ./exfm python benchmarks/worker_daemon.py --daemon pyspark.daemon   # Spark's own

One tiny local driver (the tests' config, ``local[2]``) runs ``--rounds`` Spark jobs of two tasks
whose Python function imports what a DAS worker imports (torch, numpy, pyarrow, jobs.das, the FM's
model code), with a pause of ``--idle-s`` between them: longer than Spark's minute after which an
idle worker is stopped, so every round starts new workers, as every DAS of a day in a long-lived
driver or Spark Connect server does. Prints per round the CPU seconds of the workers that ran
(each measured in itself, from its fork) and of the daemon they forked from.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import tiny_config  # noqa: E402


def worker_cpu(batches):
    """mapInArrow body: the DAS worker's imports, then this worker's and its daemon's CPU seconds."""
    import os
    import resource

    import numpy  # noqa: F401
    import pyarrow as pa
    import torch  # noqa: F401

    from jobs import das, train_fm  # noqa: F401
    from models.data import FeatureEncoder  # noqa: F401

    for _ in batches:
        pass
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{os.getppid()}/stat") as f:
        utime, stime = f.read().rsplit(")", 1)[1].split()[11:13]
    daemon = (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")
    yield pa.RecordBatch.from_pydict(
        {"pid": [os.getpid()], "cpu_s": [usage.ru_utime + usage.ru_stime], "daemon_cpu_s": [daemon]}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--daemon", default=None, help="spark.python.daemon.module (default: the project's)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle-s", type=float, default=75.0)
    args = parser.parse_args()
    from jobs.spark import build_spark

    overrides = [f"spark.conf.spark.python.daemon.module={args.daemon}"] if args.daemon else []
    spark = build_spark(tiny_config(Path(tempfile.mkdtemp(prefix="exfm-worker-daemon-")), *overrides))
    daemon = spark.conf.get("spark.python.daemon.module", "pyspark.daemon")
    rounds = []
    for r in range(args.rounds):
        if r:
            time.sleep(args.idle_s)
        t = time.monotonic()
        schema = "pid long, cpu_s double, daemon_cpu_s double"
        rows = spark.range(2, numPartitions=2).mapInArrow(worker_cpu, schema).collect()
        rounds.append(
            {
                "wall_s": round(time.monotonic() - t, 2),
                "workers": len({r["pid"] for r in rows}),
                "workers_cpu_s": round(sum(r["cpu_s"] for r in rows), 2),
                "daemon_cpu_s": round(max(r["daemon_cpu_s"] for r in rows), 2),
            }
        )
    print(json.dumps({"daemon": daemon, "rounds": rounds}))
    spark.stop()


if __name__ == "__main__":
    main()
