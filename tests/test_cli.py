"""The exfm CLI: config errors. (`exfm demo` runs the DAG: tests/test_dags.py covers it.)"""

from jobs.cli import main


def test_bad_config_exits_2_with_the_field(capsys):
    assert main(["ingest", "--ds", "2026-01-01", "--set", "spark.shuffle_partitions=-1"]) == 2
    assert "spark.shuffle_partitions" in capsys.readouterr().err
