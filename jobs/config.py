"""The one ExFM config: defaults in code, a YAML file, then env and CLI overrides, validated on load.

Precedence (last wins): field defaults < YAML file < ``EXFM__A__B=v`` env vars < ``--set a.b=v``.
A bad value fails at load with a message that names the field path (``vms.1.dense.0``).
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "exfm.yaml"
ENV_PREFIX = "EXFM__"

# Columns every VM's traffic carries (DESIGN.md §2). Features and labels may not reuse them.
CONTRACT_COLUMNS = ("request_id", "event_ts", "user_id", "ad_id")
# ds/vm are partition columns; source_vms is added by the FM dataset.
RESERVED_COLUMNS = (*CONTRACT_COLUMNS, "ds", "vm", "source_vms")

# Table, column and VM names end up in paths and SQL identifiers: keep them boring.
Identifier = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class DataError(ValueError):
    """A day's data breaks the input contract, a quality gate or an alarm (a stale teacher): running
    again cannot fix it, so the CLI exits 1 with the message alone and the DAG fails the task
    without a retry."""


class ConfigError(ValueError):
    """The config file or an override is invalid; the message names the field."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Method = Literal["none", "kd", "ah", "ah_sa"]  # paper §3.3-3.4 (see models/losses.py)


class VmSpec(_Frozen):
    """One Vertical Model in the registry: its own view of the traffic."""

    name: Identifier
    categorical: tuple[Identifier, ...] = ()  # hashed/embedded ids, stored as strings
    dense: tuple[Identifier, ...] = ()  # real-valued, stored as double
    label: Identifier = "click"  # binary 0/1
    # What the label means (paper Table 5: several tasks on the same requests). The FM has one
    # head per label column and the DAS scores a VM with its label's head; the synthetic
    # generator draws the label from the task's truth (correlated click, like, follow).
    task: Literal["ctr", "like", "follow"] = "ctr"
    model: Literal["fm", "fmfm", "deepfm"] = "deepfm"  # the student's backbone
    # Methods the daily DAG trains and evaluates for this VM: production plus the baseline,
    # so the report always shows the FM's NE gain over `none`.
    methods: tuple[Method, ...] = Field(("ah_sa", "none"), min_length=1)

    @property
    def features(self) -> tuple[str, ...]:
        return (*self.categorical, *self.dense)

    @model_validator(mode="after")
    def _check_columns(self) -> VmSpec:
        names = [*self.features, self.label]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"VM {self.name!r} declares {dupes} more than once (features and label)")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"VM {self.name!r} lists a method twice: {list(self.methods)}")
        reserved = sorted(set(names) & set(RESERVED_COLUMNS))
        if reserved:
            raise ValueError(f"VM {self.name!r} uses reserved column names {reserved}")
        return self


class SparkSettings(_Frozen):
    master: str = "local[*]"
    # sc://host:port of a Spark Connect server (`./exfm spark-server`): the jobs are thin clients
    # of it instead of starting a driver JVM each; master, jars and driver_memory are then the
    # server's business.
    remote: str | None = Field(None, pattern=r"^sc://[^/\s]+$")
    app_name: str = "exfm"
    shuffle_partitions: int = Field(4, ge=1)
    driver_memory: str = "2g"
    # A directory with the Delta jars, for machines that cannot reach Maven Central.
    jars_dir: str | None = None
    # Cache for resolved Delta jars; shared by every run so jars are downloaded once.
    jars_cache: str = "~/.cache/exfm/jars"
    # A local driver's JVM maps the classes of Spark and Delta from an archive (JDK class data
    # sharing) dumped once per machine into jars_cache, instead of loading and verifying them
    # again in every task: ~20% off a short job's start.
    class_archive: bool = True
    # Only the JIT's first tier (C1): a short driver on small days spends less CPU compiling.
    # Long jobs on big days want the optimising tier (false).
    quick_jit: bool = False
    # Tiny days (tests, a first look): Spark evaluates the expressions outside whole-stage code
    # generation (Delta's log and file statistics, writers, small aggregates) interpreted instead
    # of generating and compiling their code in every task, a quarter of a driver's CPU on days of
    # a few thousand rows. Per-row work is slower interpreted: false for real days (README).
    interpreted_projections: bool = False
    # The driver JVM's collector and JIT (README, "A driver's JVM"): a batch driver wants
    # throughput, not short pauses (ParallelGC, not G1), and Spark generates code for every query
    # that mostly runs a few times, so the optimising tier is kept for what is really hot (the
    # C2 thresholds ~10x the defaults). Replace the list to change them; spark.conf's
    # spark.driver.extraJavaOptions is added after it.
    java_options: tuple[str, ...] = (
        "-XX:+UseParallelGC",
        "-XX:Tier4InvocationThreshold=50000",
        "-XX:Tier4MinInvocationThreshold=20000",
        "-XX:Tier4CompileThreshold=60000",
        "-XX:Tier4BackEdgeThreshold=400000",
    )
    conf: dict[str, str] = Field(default_factory=dict)  # any other spark.* setting


class Seeds(_Frozen):
    synthetic: int = 7
    train: int = 11


class SyntheticSettings(_Frozen):
    """The embedded synthetic traffic (DESIGN.md §6)."""

    start_date: dt.date = dt.date(2026, 1, 1)  # day index 0 of the drift and churn clock
    days: int = Field(4, ge=1)  # days the demo generates
    rows_per_day: int = Field(20_000, ge=10)  # requests per day, before cross-VM sharing
    rows_per_file: int = Field(200_000, ge=1)  # also the generator's chunk: bounds its memory
    shared_rate: float = Field(0.2, ge=0, lt=1)  # share of requests also logged by another VM
    duplicate_rate: float = Field(0.002, ge=0, lt=0.5)  # duplicate log rows, dropped by ingest
    users: int = Field(5_000, ge=10)  # active users on a day
    ads: int = Field(1_000, ge=10)  # active ads on a day
    churn_rate: float = Field(0.1, ge=0, le=1)  # share of users/ads replaced each day
    drift: float = Field(0.15, ge=0)  # daily step of the ground-truth weights' mean-reverting walk
    base_ctr: dict[str, float] = Field(default_factory=dict)  # per home VM, held every day; default 0.03

    @model_validator(mode="after")
    def _check_ctr(self) -> SyntheticSettings:
        bad = {k: v for k, v in self.base_ctr.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"base_ctr must be in (0, 1): {bad}")
        return self


class FmSettings(_Frozen):
    """The teacher (paper §3.3, §4.1.3): larger than any VM, trained one pass per day."""

    arch: Literal["dcnv2", "dcn"] = "dcnv2"
    buckets: int = Field(2**14, ge=2)  # hash buckets per categorical feature
    embed_dim: int = Field(16, ge=1)
    cross_layers: int = Field(3, ge=1)
    mlp_dims: tuple[int, ...] = (256, 128)
    # Chosen by a sweep of next-day NE and rows/s (issue 12's note): one pass converges at this
    # batch with these rates, and larger batches amortise the per-step overhead.
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(3e-3, gt=0)  # Adam, dense layers
    embedding_lr: float = Field(0.2, gt=0)  # Adagrad, embedding tables (sparse rows)
    # The FM's head start (paper §4.1.1: the FM trains on days 1-4 before any VM): the VMs
    # train from the day the FM has trained this many days before it.
    warmup_days: int = Field(0, ge=0)
    # The VMs whose traffic and features the FM learns from (empty: every VM). One VM is the
    # control arm: the FM has that VM's data and features only, so any gain is capacity's.
    source_vms: tuple[Identifier, ...] = ()
    # Data-parallel training of the FM: this many processes (torch.distributed, gloo), launched
    # by Spark's TorchDistributor; each takes its slice of every batch, so the pass is the same
    # one pass over the day. On the task's machine, or as Spark barrier tasks on the cluster's
    # executors with ranks_on_executors (they must see the lakehouse at the same path).
    num_processes: int = Field(1, ge=1)
    ranks_on_executors: bool = False


class VmTrainSettings(_Frozen):
    """How the students train (paper §3.3-3.4): the method and its GS/LS/LW knobs."""

    method: Method = "ah_sa"
    buckets: int = Field(2**14, ge=2)
    embed_dim: int = Field(8, ge=1)
    mlp_dims: tuple[int, ...] = (64,)
    head_dims: tuple[int, ...] = (16,)
    batch_size: int = Field(1024, ge=1)  # smaller than the FM's: a VM's day is a share of the traffic
    lr: float = Field(3e-3, gt=0)  # Adam, dense layers
    embedding_lr: float = Field(0.2, gt=0)  # Adagrad, embedding tables (sparse rows)
    w: float = Field(1.0, ge=0)  # LW: weight of the distillation loss (Eq 5)
    alpha: float = Field(1.0, gt=0)  # LS: teacher label scale, alpha * y_F clipped at 1
    beta: float = Field(1.0, ge=0)  # GS: scale of the distillation gradient into the backbone
    adapter_hidden: tuple[int, ...] = (16, 16)  # Student Adapter MLP (Eq 6)
    adapter_lr: float = Field(1e-2, gt=0)


class BlessingSettings(_Frozen):
    """Gate before a new FM snapshot becomes eligible for the DAS (beyond the paper)."""

    enabled: bool = True
    holdout_fraction: float = Field(0.05, gt=0, lt=1)  # requests the FM never trains on
    ne_tolerance: float = Field(0.01, ge=0)  # reject if NE > reference NE + this


class DasSettings(_Frozen):
    """The Data Augmentation Service and its snapshot pointer (paper §3.2)."""

    freeze_days: int = Field(0, ge=0)  # > 0: score with an FM that many days staler
    batch_size: int = Field(4096, ge=1)  # rows per FM forward pass in a Spark worker
    pointer: Identifier = "fm"  # name of the fm_pointer row (the Zeus record)
    lease_hours: float = Field(24.0, gt=0)  # how long a reader may keep using a snapshot
    keep_last: int = Field(3, ge=1)  # gc-snapshots never deletes the newest K
    # The staleness alarm: a day whose teacher is older than this (in days; 1 = trained through
    # yesterday, as the paper's daily cadence) fails the DAG's `teacher_freshness` task.
    max_staleness_days: int = Field(2, ge=1)
    blessing: BlessingSettings = BlessingSettings()


class NotifierSpec(_Frozen):
    """An Airflow notifier (a ``BaseNotifier`` class: a provider's SMTP, Slack, ...) and its arguments."""

    cls: str = Field(alias="class", pattern=r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+$")  # module.Class
    args: dict[str, Any] = Field(default_factory=dict)


class AlertSettings(_Frozen):
    """Who hears about an alarm (a stale teacher): the notifiers the DAG's failure callback calls."""

    notifiers: tuple[NotifierSpec, ...] = ()


class QualitySettings(_Frozen):
    """Data-quality gates (jobs/quality.py): the bands and ranges the GX suites check."""

    # Bands are relative to the mean of the table's published days in this trailing window;
    # without history (the first day) they are skipped.
    trailing_days: int = Field(7, ge=1)
    row_count_factor: float = Field(3.0, gt=1)  # rows within [mean / f, mean * f]
    ctr_factor: float = Field(2.0, gt=1)  # each label's mean within [mean / f, mean * f]
    teacher_ctr_factor: float = Field(3.0, gt=1)  # mean teacher_score within [ctr / f, ctr * f]
    # share of a day's rows whose user_id (ad_id) was seen in the trailing days within [mean / f, mean * f]
    id_continuity_factor: float = Field(2.0, gt=1)
    min_id_seen_share: float = Field(0.05, ge=0, le=1)  # ... and at least this, once there are trailing days
    # A request a VM logged more than once with different labels: ingest stops when more than this
    # share of a VM's requests conflict (0: any); below it, one line is kept without favouring a label.
    max_conflicting_labels: float = Field(0.0, ge=0, le=1)
    # Dense feature -> [min, max] (inclusive). Features without a range must still be finite.
    dense_ranges: dict[Identifier, tuple[float, float]] = Field(default_factory=dict)
    # The Data Docs index lists the newest validation results only (each gate rebuilds it, reading
    # every result it lists); older ones keep their pages, linked from dq_results and the reports.
    docs_index_results: int = Field(60, ge=1)
    gx_root: str | None = None  # GX file project (suites, results); default <lakehouse_root>/_gx
    docs_root: str | None = None  # the Data Docs static site; default <lakehouse_root>/data_docs

    @model_validator(mode="after")
    def _check_ranges(self) -> QualitySettings:
        bad = {k: v for k, v in self.dense_ranges.items() if not v[0] < v[1]}
        if bad:
            raise ValueError(f"dense_ranges must be [min, max] with min < max: {bad}")
        return self


class MaintenanceSettings(_Frozen):
    """Retention of the weekly `exfm_maintenance` DAG (jobs/maintenance.py); days count back from its ds."""

    # VACUUM keeps every file a version of this age needs: readers, lineage and backfills that pin a
    # version inside it still time-travel. Delta's safety check refuses less than 7 days; so do we.
    retention_hours: int = Field(168, ge=168)
    staging_days: int = Field(7, ge=1)  # published days leave the staging copies after this
    quarantine_days: int = Field(30, ge=1)  # failed attempts are kept this long for inspection
    scratch_hours: float = Field(24.0, gt=0)  # _scratch dirs older than this belong to no live reader
    keep_vm_snapshots: int = Field(3, ge=1)  # newest K per (vm, method) always stay
    snapshot_days: int = Field(14, ge=1)  # VM snapshots of the last N days stay: a backfill resumes from them
    data_docs_days: int = Field(90, ge=1)  # GX validation results and their Data Docs pages


class ExfmConfig(_Frozen):
    lakehouse_root: str = "./lakehouse"  # Delta tables; any Hadoop path (s3a://...) works
    landing_root: str = "./landing"  # raw logs: landing/ds=YYYY-MM-DD/vm=<name>/*.parquet|csv
    truth_root: str = "./synthetic_truth"  # synthetic true click probabilities (oracle only)
    snapshots_root: str | None = None  # model snapshots; default <lakehouse_root>/snapshots
    spark: SparkSettings = SparkSettings()
    seeds: Seeds = Seeds()
    synthetic: SyntheticSettings = SyntheticSettings()
    fm: FmSettings = FmSettings()
    vm_training: VmTrainSettings = VmTrainSettings()
    das: DasSettings = DasSettings()
    quality: QualitySettings = QualitySettings()
    alerts: AlertSettings = AlertSettings()
    maintenance: MaintenanceSettings = MaintenanceSettings()
    vms: tuple[VmSpec, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_registry(self) -> ExfmConfig:
        # Every problem at once, not one per round. Settings for names the registry does not have
        # (synthetic.base_ctr of the demo's VMs, quality.dense_ranges of undeclared features) do
        # not apply to it and are ignored, so a config for your own logs needs no emptying.
        problems = []
        names = [v.name for v in self.vms]
        if len(set(names)) != len(names):
            problems.append(f"VM names must be unique, got {names}")
        if "all" in names:  # vm_eval's row of the FM on every VM's requests (evaluate.ALL_VMS)
            problems.append("VM name 'all' is reserved: vm_eval uses it for the FM on the merged dataset")
        # One feature name = one meaning = one column of the FM dataset, so one kind.
        kinds: dict[str, str] = {}
        for vm in self.vms:
            for kind, cols in (("categorical", vm.categorical), ("dense", vm.dense), ("label", (vm.label,))):
                for col in cols:
                    if kinds.setdefault(col, kind) != kind:
                        problems.append(
                            f"column {col!r} is {kinds[col]} in one VM and {kind} in VM {vm.name!r}"
                        )
        tasks: dict[str, str] = {}  # a label column merges across VMs in the FM dataset: one meaning
        for vm in self.vms:
            if tasks.setdefault(vm.label, vm.task) != vm.task:
                problems.append(
                    f"label {vm.label!r} is task {tasks[vm.label]!r} in one VM "
                    f"and {vm.task!r} in VM {vm.name!r}"
                )
        if set(self.fm.source_vms) - set(names):
            problems.append(f"fm.source_vms {list(self.fm.source_vms)}: VMs not in the registry {names}")
        if (
            self.das.lease_hours > self.maintenance.retention_hours
        ):  # VACUUM would delete a leased reader's files
            problems.append(
                f"das.lease_hours ({self.das.lease_hours}) must not exceed maintenance.retention_hours "
                f"({self.maintenance.retention_hours})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    # --- derived views of the registry -------------------------------------------------
    def vm(self, name: str) -> VmSpec:
        for v in self.vms:
            if v.name == name:
                return v
        raise KeyError(f"unknown VM {name!r}; the registry has {[v.name for v in self.vms]}")

    def vm_method_pairs(self) -> list[dict[str, str]]:
        """Every (vm, method) the daily DAG trains: the fan-out of train_vm."""
        return [{"vm": v.name, "method": m} for v in self.vms for m in v.methods]

    @property
    def categorical_features(self) -> tuple[str, ...]:
        """Union of the VMs' categorical features, in registry order."""
        return _ordered_union(v.categorical for v in self.vms)

    @property
    def dense_features(self) -> tuple[str, ...]:
        return _ordered_union(v.dense for v in self.vms)

    @property
    def labels(self) -> tuple[str, ...]:
        return _ordered_union((v.label,) for v in self.vms)

    @property
    def fm_vms(self) -> tuple[VmSpec, ...]:
        """The VMs whose traffic the FM dataset holds (``fm.source_vms``, default every VM)."""
        return tuple(v for v in self.vms if not self.fm.source_vms or v.name in self.fm.source_vms)

    @property
    def fm_labels(self) -> tuple[str, ...]:
        """The FM's tasks: its source VMs' labels, in registry order (one head each)."""
        return _ordered_union((v.label,) for v in self.fm_vms)

    @property
    def fm_categorical_features(self) -> tuple[str, ...]:
        """The FM's categorical features: the union of its source VMs', in registry order."""
        return _ordered_union(v.categorical for v in self.fm_vms)

    @property
    def fm_dense_features(self) -> tuple[str, ...]:
        return _ordered_union(v.dense for v in self.fm_vms)

    def table(self, name: str) -> str:
        """Location of a Delta table under the lakehouse root."""
        return f"{_absolute(self.lakehouse_root)}/{name}"

    @property
    def snapshots(self) -> str:
        return _absolute(self.snapshots_root) if self.snapshots_root else self.table("snapshots")

    @property
    def gx_root(self) -> str:
        return _absolute(self.quality.gx_root) if self.quality.gx_root else self.table("_gx")

    @property
    def docs_root(self) -> str:
        return _absolute(self.quality.docs_root) if self.quality.docs_root else self.table("data_docs")

    @property
    def landing(self) -> str:
        return _absolute(self.landing_root)

    @property
    def truth(self) -> str:
        return _absolute(self.truth_root)


def _ordered_union(groups: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for g in groups for c in g))


def _absolute(path: str) -> str:
    """Local paths become absolute so Spark and pyarrow agree; URIs pass through."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path):
        return path.rstrip("/")
    return str(Path(path).expanduser().resolve())


def parse_ds(ds: str | dt.date) -> dt.date:
    """A day partition. Only ever built from a real date, so it is safe inside predicates."""
    if isinstance(ds, dt.date):
        return ds
    try:
        return dt.date.fromisoformat(ds)
    except (TypeError, ValueError):
        raise ValueError(f"ds must be a date YYYY-MM-DD, got {ds!r}") from None


# --- loading ---------------------------------------------------------------------------
def load_config(
    path: str | os.PathLike | None = None,
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> ExfmConfig:
    """Load and validate the config. ``path`` defaults to $EXFM_CONFIG, then exfm.yaml."""
    env = os.environ if env is None else env
    path = Path(path or env.get("EXFM_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    env_overrides = [
        f"{k[len(ENV_PREFIX) :].lower().replace('__', '.')}={v}"
        for k, v in sorted(env.items())
        if k.startswith(ENV_PREFIX)
    ]
    for source, items in (("env", env_overrides), ("override", overrides)):
        for item in items:
            _apply_override(raw, item, source)
    try:
        return ExfmConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {_describe(err)}" for err in e.errors()]
        raise ConfigError(f"invalid config {path}:\n" + "\n".join(lines)) from None


def _describe(err: Mapping[str, Any]) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<root>"
    shown = "" if isinstance(err["input"], dict | list) else f" (got {err['input']!r})"
    return f"{field}: {err['msg']}{shown}"


# spark.conf's keys are Spark's dotted names: ``spark.conf.spark.ui.enabled`` sets its key
# ``spark.ui.enabled``.
SPARK_CONF = "spark.conf."


def _apply_override(raw: dict[str, Any], item: str, source: str) -> None:
    """Set ``a.b.0.c=value`` in the raw dict; the value is parsed as a YAML scalar/list."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{source} {item!r} must look like key.path=value")
    if key.startswith(SPARK_CONF) and len(key) > len(SPARK_CONF):  # one key, a string as Spark takes
        *parents, leaf = "spark", "conf", key[len(SPARK_CONF) :]
        parsed: Any = value.strip()
    else:
        *parents, leaf = key.split(".")
        parsed = yaml.safe_load(value)
    node: Any = raw
    for part in parents:
        if isinstance(node, list):
            node = node[_index(node, part, key)]
        else:
            node = node.setdefault(part, {})
    if isinstance(node, list):
        node[_index(node, leaf, key)] = parsed
    elif isinstance(node, dict):
        node[leaf] = parsed
    else:
        raise ConfigError(f"{source} {item!r}: {'.'.join(parents)} is not a mapping")


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a list of {len(node)}")
    return int(part)
