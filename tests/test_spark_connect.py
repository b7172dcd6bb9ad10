"""The jobs through Spark Connect (`./exfm spark-server`, config `spark.remote`) write the same tables
as through a classic driver, on the same landing files.

One server for the module, on loopback and a free port. The Connect side runs in a process of its
own (a Connect client cannot share a process with a classic driver): ingest, the gates (GX on a
Connect DataFrame), the FM dataset, the FM's publication and the pointer (MERGE), and the DAS
(``mapInArrow`` with torch in the server's Python workers).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time

import pytest

from jobs import das, generate, publishing, quality, train_fm
from jobs.lakehouse import (
    DQ_RESULTS,
    FM_DATASET,
    FM_POINTER,
    FM_SNAPSHOTS,
    VM_TRAFFIC,
    VM_TRAINING,
    is_delta,
)
from tests.conftest import REPO, land_days, stop_group, tiny_config
from tests.test_airflow_e2e import VOLATILE
from tests.test_ingest import checksum

DAYS = [dt.date(2026, 1, 1), dt.date(2026, 1, 2)]
TABLES = (VM_TRAFFIC, FM_DATASET, VM_TRAINING, FM_SNAPSHOTS, FM_POINTER, DQ_RESULTS)


def pipeline(cfg, spark) -> None:
    """Days 1-2 landed and gated, the FM of day 1 published and pointed at, day 2 scored and gated."""
    land_days(DAYS, cfg, spark)
    assert train_fm.run(DAYS[0], cfg, spark)["published"]["status"] == "blessed"
    publishing.update_pointer(cfg, spark)
    das.run(DAYS[1], cfg, spark)
    assert quality.run(VM_TRAINING, DAYS[1], cfg, spark)["success"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spark_server(tmp_path_factory):
    """`./exfm spark-server` on a free loopback port: its sc:// URL, stopped after the module."""
    port, log = _free_port(), tmp_path_factory.mktemp("spark-server") / "server.log"
    argv = [str(REPO / "exfm"), "spark-server", "--port", str(port), "--set", "spark.master=local[2]"]
    with open(log, "w") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        yield f"sc://127.0.0.1:{port}"
    finally:
        stop_group(server)


def _content(spark, cfg) -> dict:
    out = {}
    for table in TABLES:
        assert is_delta(cfg.table(table)), table
        df = spark.read.format("delta").load(cfg.table(table))
        out[table] = checksum(df.drop(*VOLATILE, "lease_expires_at", "updated_at"))
    return out


def test_connect_writes_the_tables_a_classic_driver_writes(spark, spark_server, tmp_path):
    landing = [f"landing_root={tmp_path / 'landing'}", f"truth_root={tmp_path / 'truth'}"]
    classic = tiny_config(tmp_path / "classic", *landing)
    connect = tiny_config(tmp_path / "connect", *landing, f"spark.remote={spark_server}")
    for day in DAYS:
        generate.run(day, classic)

    overrides = [*landing, f"spark.remote={spark_server}"]
    script = (
        "from pathlib import Path; from jobs.spark import build_spark, is_connect;"
        "from tests.conftest import tiny_config; from tests.test_spark_connect import pipeline;"
        f"cfg = tiny_config(Path({str(tmp_path / 'connect')!r}), *{overrides!r});"
        "spark = build_spark(cfg); assert is_connect(spark), type(spark); pipeline(cfg, spark)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    pipeline(classic, spark)
    assert _content(spark, connect) == _content(spark, classic)
