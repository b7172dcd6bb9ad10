"""The exfm CLI: the demo command end to end on tiny data, and config errors."""

from delta.tables import DeltaTable

from jobs.cli import main
from jobs.lakehouse import FM_DATASET, VM_TRAFFIC, VM_TRAINING
from tests.conftest import TINY


def test_demo_runs_every_day_and_prints_a_summary(spark, tmp_path, capsys):
    args = ["demo", "--days", "2", "--config", "exfm.yaml"]
    for item in [
        *TINY,
        f"lakehouse_root={tmp_path}/lh",
        f"landing_root={tmp_path}/landing",
        f"truth_root={tmp_path}/truth",
    ]:
        args += ["--set", item]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("2026-")]
    assert [line[:10] for line in lines] == ["2026-01-01", "2026-01-02"]
    assert all("fm_dataset: " in line and "feed=" in line and "FM trained" in line for line in lines)
    assert "DAS: no FM yet" in lines[0] and "requests scored by fm-2026-01-01-" in lines[1]
    assert sorted(p.name for p in (tmp_path / "lh" / "snapshots" / "fm").iterdir()) == [
        "ds=2026-01-01",
        "ds=2026-01-02",
    ]
    for table in (VM_TRAFFIC, FM_DATASET, VM_TRAINING):
        dt = DeltaTable.forPath(spark, f"{tmp_path}/lh/{table}")
        assert dt.toDF().select("ds").distinct().count() == (1 if table == VM_TRAINING else 2)


def test_bad_config_exits_2_with_the_field(capsys):
    assert main(["ingest", "--ds", "2026-01-01", "--set", "spark.shuffle_partitions=-1"]) == 2
    assert "spark.shuffle_partitions" in capsys.readouterr().err
