"""The SparkSession builder's failure modes give errors that say what to do."""

import pytest

from jobs import spark as spark_setup
from jobs.spark import SparkSetupError


@pytest.mark.parametrize(
    ("jar", "artifact"),
    [
        ("org.apache.hadoop_hadoop-client-api-3.4.2.jar", "hadoop-client-api"),
        ("hadoop-client-api-3.5.0.jar", "hadoop-client-api"),
        ("io.delta_delta-spark_4.2_2.13-4.4.0.jar", "delta-spark_4.2_2.13"),
        ("com.github.luben_zstd-jni-1.5.7-3.jar", "zstd-jni"),
        ("jackson-datatype-jdk8-2.13.5.jar", "jackson-datatype-jdk8"),
    ],
)
def test_jar_names_map_to_artifacts(jar, artifact):
    assert spark_setup._artifact(jar) == artifact


def test_missing_java_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SparkSetupError, match="install it"):
        spark_setup._require_java()


def test_jars_dir_without_delta_is_rejected(tmp_path):
    (tmp_path / "other.jar").write_bytes(b"")
    with pytest.raises(SparkSetupError, match="holds no delta-spark jar"):
        spark_setup.delta_jars(str(tmp_path), str(tmp_path / "cache"))


def test_unresolvable_jars_name_the_env_var(monkeypatch, tmp_path):
    """Both resolvers really run (Ivy, then Maven) and fail on a version that does not exist."""
    monkeypatch.setattr(spark_setup, "delta_coordinate", lambda: "io.delta:delta-spark_4.2_2.13:0.0.404")
    with pytest.raises(SparkSetupError) as e:
        spark_setup.delta_jars(None, str(tmp_path / "cache"))
    assert "EXFM__SPARK__JARS_DIR" in str(e.value) and "0.0.404" in str(e.value)
    assert not list((tmp_path / "cache").rglob("*.jar"))


def test_resolved_jars_are_cached_without_spark_bundled_ones(spark):
    jars = spark_setup.delta_jars(None, spark.conf.get("spark.jars").split(",")[0].rsplit("/", 2)[0])
    names = {spark_setup._artifact(p.name) for p in jars}
    assert any(n.startswith("delta-spark") for n in names) and "delta-storage" in names
    assert "hadoop-client-api" not in names  # pyspark bundles it


def test_the_driver_maps_its_class_archive_and_collector_and_a_failed_dump_is_not_retried(
    spark, tmp_path, caplog
):
    import re
    from pathlib import Path

    options = spark.sparkContext.getConf().get("spark.driver.extraJavaOptions")
    archive = re.search(r"-XX:SharedArchiveFile=(\S+)", options).group(1)
    assert "-XX:TieredStopAtLevel" not in options  # spark.quick_jit is off by default
    pid = spark.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    assert archive in Path(f"/proc/{pid}/maps").read_text()  # the JVM mapped the archive's classes
    management = spark.sparkContext._jvm.java.lang.management.ManagementFactory
    collectors = {gc.getName() for gc in management.getGarbageCollectorMXBeans()}
    assert collectors == {"PS Scavenge", "PS MarkSweep"}  # spark.java_options: the throughput collector

    missing = [tmp_path / "no-such.jar"]  # spark-submit refuses it: no archive, the driver starts without
    assert spark_setup.class_archive(missing, str(tmp_path)) is None
    assert "no class-data archive" in caplog.text
    failed = list((tmp_path / "cds").glob("*.failed"))
    assert len(failed) == 1 and failed[0].read_text()
    caplog.clear()
    assert spark_setup.class_archive(missing, str(tmp_path)) is None and not caplog.text  # not tried again


def test_interpreted_projections_reach_the_session_only_when_asked(spark):
    from jobs.config import load_config
    from tests.conftest import REPO

    # The tests' tiny days ask for them (conftest.TINY); the shipped config generates code.
    assert spark.conf.get("spark.sql.codegen.factoryMode") == "NO_CODEGEN"
    shipped = spark_setup._session_conf(load_config(REPO / "exfm.yaml", env={}))
    assert "spark.sql.codegen.factoryMode" not in shipped
    # ... and no web UI (`--set spark.conf.spark.ui.enabled=false` in TINY): nothing listens.
    assert spark.sparkContext.uiWebUrl is None


def test_python_workers_fork_from_a_daemon_with_torch_loaded(spark):
    """The DAS's workers start with torch imported: their parent is jobs.worker_daemon, which loaded it."""

    def parent_of_worker(batches):
        import os

        import pyarrow as pa

        for _ in batches:
            pass
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
        with open(f"/proc/{os.getppid()}/maps") as f:
            torch_mapped = "libtorch_cpu" in f.read()
        yield pa.RecordBatch.from_pydict({"argv": [" ".join(argv)], "torch": [torch_mapped]})

    schema = "argv string, torch boolean"
    rows = spark.range(4, numPartitions=2).mapInArrow(parent_of_worker, schema).collect()
    assert rows and all("-m jobs.worker_daemon" in r["argv"] and r["torch"] for r in rows), rows
