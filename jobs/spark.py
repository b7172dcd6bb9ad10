"""SparkSession with Delta Lake, and the Delta jars it needs, resolved once and cached.

Jar resolution order:
1. ``spark.jars_dir`` (env ``EXFM__SPARK__JARS_DIR``): a directory of jars you provide;
2. the cache (``spark.jars_cache``): jars resolved by an earlier run;
3. Spark's own resolver (Ivy, Maven Central), then copied into the cache;
4. Maven (``mvn dependency:copy-dependencies``) into the cache, if Ivy fails.
Jars that pyspark already bundles (hadoop, parquet, jackson, ...) are left out so Spark's
own versions are the only ones on the classpath.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.config import ExfmConfig

SCALA = "2.13"
LOG4J2 = Path(__file__).with_name("log4j2.properties")  # the jobs' JVM logging (warnings, short traces)
# What a driver does while the classes it loads are archived (``class_archive``).
CDS_WORKLOAD = Path(__file__).with_name("cds_workload.py")
DELTA_CONF = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}
# Python workers fork from a daemon that has imported torch (jobs/worker_daemon.py).
WORKER_CONF = {"spark.python.daemon.module": "jobs.worker_daemon"}
log = logging.getLogger(__name__)


class SparkSetupError(RuntimeError):
    """Java or the Delta jars are missing; the message says what to install or set."""


def delta_coordinate() -> str:
    """Maven coordinate of the Delta jar matching the installed pyspark and delta-spark."""
    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_{SCALA}:{importlib.metadata.version('delta-spark')}"


def _session_conf(cfg: ExfmConfig) -> dict[str, str]:
    """The SQL settings every job's session needs, on a local driver or a Spark Connect session."""
    return {
        "spark.sql.shuffle.partitions": str(cfg.spark.shuffle_partitions),
        # Days are UTC days: event_ts must not shift with the machine's time zone.
        "spark.sql.session.timeZone": "UTC",
        # Delta's SQL parser drops the parameters of spark.sql(args=...) on Spark >= 4.1
        # (delta-io/delta#7640); the legacy substitution binds them before parsing.
        "spark.sql.legacy.parameterSubstitution.constantsOnly": "true",
        # INT96 (the default) has no min/max statistics; readers order files by event_ts stats.
        "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
        # pandas writes event times as TIMESTAMP(NANOS), which Spark cannot read as a timestamp;
        # read as the int64 they are, ingest converts them to microseconds (jobs/ingest.py).
        "spark.sql.legacy.parquet.nanosAsLong": "true",
        # VACUUM lists a table's files in a Spark job of this many tasks (default 10,000: minutes of
        # scheduling on a small driver for a table of a few hundred files); size it like the shuffles.
        "spark.sql.sources.parallelPartitionDiscovery.parallelism": str(cfg.spark.shuffle_partitions),
        **({"spark.sql.codegen.factoryMode": "NO_CODEGEN"} if cfg.spark.interpreted_projections else {}),
    }


def build_spark(cfg: ExfmConfig):
    """Get or create the SparkSession described by ``cfg.spark``, with Delta enabled: a Spark
    Connect session when ``spark.remote`` is set, else a driver of its own (``spark.master``)."""
    from pyspark.sql import SparkSession

    if cfg.spark.remote:
        builder = SparkSession.builder.remote(cfg.spark.remote)
        for key, value in _session_conf(cfg).items():
            builder = builder.config(key, value)
        return builder.getOrCreate()
    spark = _driver_builder(cfg).getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _driver_builder(cfg: ExfmConfig):
    from pyspark.sql import SparkSession

    s = cfg.spark
    _require_java()
    jars = delta_jars(s.jars_dir, s.jars_cache)
    # The JVM logs at WARN from its first line (setLogLevel comes after the startup INFO lines).
    java_options = [f"-Dlog4j2.configurationFile={LOG4J2.as_uri()}", *s.java_options]
    archive = class_archive(jars, s.jars_cache) if s.class_archive else None
    if archive is not None:
        # The JDK's own base archive was dumped without the --add-modules/--add-opens Spark's
        # launcher passes, so the JVM maps the classes but not the archived module graph; from
        # JDK 24 on it says so at every start as [error][cds] lines on stdout, a CLI's output.
        java_options += [f"-XX:SharedArchiveFile={archive}", "-Xlog:cds=off"]
    if s.quick_jit:
        java_options.append("-XX:TieredStopAtLevel=1")
    conf = dict(s.conf)
    java_options.append(conf.pop("spark.driver.extraJavaOptions", ""))  # the user's, added to ours
    builder = (
        SparkSession.builder.master(s.master)
        .appName(s.app_name)
        .config("spark.jars", ",".join(str(p) for p in jars))
        .config("spark.driver.memory", s.driver_memory)
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.extraJavaOptions", " ".join(java_options).strip())
    )
    for key, value in {**DELTA_CONF, **WORKER_CONF, **_session_conf(cfg), **conf}.items():
        builder = builder.config(key, value)
    return builder


def class_archive(jars: list[Path], jars_cache: str) -> Path | None:
    """The class-data archive (JDK CDS) of a driver with Delta's ``jars``, dumped on first use.

    One per JVM build, pyspark and jar set, under ``jars_cache``: a driver started with
    ``-XX:SharedArchiveFile`` maps Spark's and Delta's classes, already parsed and verified,
    instead of loading them again. A JVM that finds the archive unusable ignores it (CDS's
    default ``-Xshare:auto``). None, with a warning once, where the JVM cannot dump one.
    """
    import hashlib

    version = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    java = [line for line in version if not line.startswith(("NOTE:", "Picked up"))]  # not JVM options
    classpath = sorted(p.name for p in [*_pyspark_jars().glob("*.jar"), *jars])
    key = hashlib.sha256("\n".join([*java, *classpath]).encode()).hexdigest()[:16]
    archive = Path(jars_cache).expanduser() / "cds" / f"driver-{key}.jsa"
    failed = archive.with_suffix(".failed")  # why the dump failed: not tried again
    if not archive.exists() and not failed.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with open(archive.parent / ".lock", "w") as lock:  # one dump at a time per machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not archive.exists() and not failed.exists():
                try:
                    _dump_class_archive(archive, jars)
                except (OSError, subprocess.SubprocessError) as e:
                    failed.write_text(f"{e}\n{getattr(e, 'stderr', '') or ''}")
                    log.warning("no class-data archive for the Spark driver (%s): %s", failed, e)
    return archive if archive.exists() else None


def _dump_class_archive(archive: Path, jars: list[Path]) -> None:
    """Run a short Delta workload in a driver that writes the classes it loaded to ``archive``.

    spark-submit is the JVM's parent here, so the archive is complete when it returns.
    """
    partial = archive.with_name(f"{archive.name}.{os.getpid()}.partial")
    submit = Path(_pyspark_jars().parent, "bin", "spark-submit")
    with tempfile.TemporaryDirectory(prefix="exfm-cds-") as work:
        options = [f"-XX:ArchiveClassesAtExit={partial}", f"-Dlog4j2.configurationFile={LOG4J2.as_uri()}"]
        argv = [str(submit), "--master", "local[1]", "--jars", ",".join(map(str, jars))]
        for key, value in {**DELTA_CONF, "spark.ui.enabled": "false"}.items():
            argv += ["--conf", f"{key}={value}"]
        argv += ["--driver-java-options", " ".join(options), str(CDS_WORKLOAD), str(Path(work, "table"))]
        python = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        subprocess.run(
            argv, check=True, capture_output=True, text=True, timeout=900, env={**os.environ, **python}
        )
    if not partial.exists():
        raise OSError(f"the JVM wrote no archive at {partial}")
    partial.rename(archive)


def is_connect(spark) -> bool:
    """Whether ``spark`` is a Spark Connect session (no JVM, no SparkContext in this process)."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def serve(cfg: ExfmConfig, port: int = 15002, host: str = "127.0.0.1") -> None:
    """Run a Spark Connect server with Delta in the foreground until SIGTERM/SIGINT.

    One driver JVM for every job that connects (``spark.remote: sc://host:port``): the jobs pay
    no JVM start and no cold JIT. Its Python workers (``mapInArrow``: the DAS's torch scorer)
    run this interpreter with this clone on the path, so the client's functions import here.
    """
    import signal
    import threading

    builder = (
        _driver_builder(cfg)
        .config("spark.plugins", "org.apache.spark.sql.connect.SparkConnectPlugin")
        .config("spark.connect.grpc.binding.address", host)
        .config("spark.connect.grpc.binding.port", str(port))
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"spark-server: Spark Connect with Delta on sc://{host}:{port} (Ctrl-C stops it)", flush=True)
    stop.wait()
    spark.stop()


def _require_java() -> None:
    java = shutil.which("java")
    if java is None:
        raise SparkSetupError(
            "Java was not found on PATH. Spark needs Java 17 or newer: install it "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless) or set JAVA_HOME and put "
            "$JAVA_HOME/bin on PATH."
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    if match and int(match.group(1)) < 17:
        raise SparkSetupError(f"Spark 4 needs Java 17 or newer; {java} is: {out.splitlines()[0]}")


def delta_jars(jars_dir: str | None, jars_cache: str) -> list[Path]:
    """Paths of the Delta jars, resolving and caching them on first use."""
    coordinate = delta_coordinate()
    if jars_dir:
        jars = sorted(Path(jars_dir).expanduser().glob("*.jar"))
        if not any(p.name.startswith(("delta-spark", "io.delta_delta-spark")) for p in jars):
            raise SparkSetupError(
                f"spark.jars_dir={jars_dir} holds no delta-spark jar; put {coordinate} and its "
                "dependencies (delta-storage, ...) there"
            )
        return jars
    cache = Path(jars_cache).expanduser() / coordinate.replace(":", "_")
    done = cache / ".complete"
    if not done.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        with open(cache.parent / ".lock", "w") as lock:  # one resolver at a time per machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                _resolve_into(cache, coordinate)
                done.touch()
    return sorted(cache.glob("*.jar"))


def _resolve_into(cache: Path, coordinate: str) -> None:
    with tempfile.TemporaryDirectory(prefix="exfm-jars-") as tmp:
        errors = []
        for resolver in (_resolve_with_ivy, _resolve_with_maven):
            try:
                jars = resolver(coordinate, Path(tmp) / resolver.__name__)
                break
            except (OSError, subprocess.CalledProcessError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                errors.append(f"{resolver.__name__}: {_tail(detail)}")
        else:
            raise SparkSetupError(
                f"Could not resolve the Delta jars {coordinate} from Maven Central.\n"
                + "\n".join(errors)
                + f"\nFix the network, or download {coordinate} and its dependencies into a "
                "directory and point EXFM__SPARK__JARS_DIR (config spark.jars_dir) at it."
            )
        staging = cache.with_name(cache.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        bundled = {_artifact(p.name) for p in _pyspark_jars().glob("*.jar")}
        for jar in jars:
            if _artifact(jar.name) not in bundled:
                shutil.copy2(jar, staging / jar.name)
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)


def _resolve_with_ivy(coordinate: str, work: Path) -> list[Path]:
    """Let spark-submit resolve the package (what --packages does) into an Ivy dir."""
    work.mkdir(parents=True)
    noop = work / "noop.py"
    noop.write_text("")
    submit = Path(_pyspark_jars().parent, "bin", "spark-submit")
    subprocess.run(
        [str(submit), "--packages", coordinate, "--conf", f"spark.jars.ivy={work / 'ivy'}", str(noop)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable},
    )
    return sorted((work / "ivy" / "jars").glob("*.jar"))


def _resolve_with_maven(coordinate: str, work: Path) -> list[Path]:
    group, artifact, version = coordinate.split(":")
    work.mkdir(parents=True)
    (work / "pom.xml").write_text(f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>exfm</groupId><artifactId>delta-jars</artifactId><version>1</version>
  <dependencies><dependency>
    <groupId>{group}</groupId><artifactId>{artifact}</artifactId><version>{version}</version>
  </dependency></dependencies>
</project>
""")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise OSError("mvn is not installed")
    subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={work / 'jars'}",
        ],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return sorted((work / "jars").glob("*.jar"))


def _pyspark_jars() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent / "jars"


def _artifact(jar_name: str) -> str:
    """Ivy's 'org.apache.hadoop_hadoop-client-api-3.4.2.jar' or Maven's name -> 'hadoop-client-api'."""
    group, sep, rest = jar_name.partition("_")
    name = rest if sep and "." in group else jar_name
    match = re.match(r"^(.*?)-\d[^/]*\.jar$", name)
    return match.group(1) if match else name


def _tail(text: str, lines: int = 8) -> str:
    return "\n    ".join(text.strip().splitlines()[-lines:])
