import pytest

from jobs.config import ConfigError, load_config
from tests.conftest import REPO


def test_default_config_loads_the_vm_registry():
    cfg = load_config(REPO / "exfm.yaml", env={})
    assert [v.name for v in cfg.vms] == ["feed", "search", "video"]
    assert cfg.spark.master == "local[*]"
    assert cfg.lakehouse_root == "./lakehouse"
    # The FM sees the union of the VMs' features, each once.
    assert len(cfg.categorical_features) == len(set(cfg.categorical_features))
    for vm in cfg.vms:
        assert set(vm.categorical) <= set(cfg.categorical_features)
        assert set(vm.dense) <= set(cfg.dense_features)


def test_env_then_cli_overrides_win_in_that_order():
    env = {"EXFM__SPARK__MASTER": "local[2]", "EXFM__SYNTHETIC__DAYS": "9"}
    cfg = load_config(REPO / "exfm.yaml", overrides=["synthetic.days=3"], env=env)
    assert cfg.spark.master == "local[2]"
    assert cfg.synthetic.days == 3
    cfg = load_config(REPO / "exfm.yaml", overrides=["vms.0.label=conversion"], env={})
    assert cfg.vm("feed").label == "conversion"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("spark.shuffle_partitions=0", "spark.shuffle_partitions"),
        ("vms.1.dense.0=not-an-identifier", "vms.1.dense.0"),
        ("vms.2.categorical.0=ad_quality", "ad_quality"),  # dense elsewhere: one meaning, one kind
        ("vms.1.name=feed", "unique"),
        ("vms.0.categorical.0=request_id", "reserved"),
        ("synthetic.shared_rate=1.5", "synthetic.shared_rate"),
        ("spark.masterr=local", "spark.masterr"),  # typos are errors, not silently ignored
        ("fm.source_vms=[feed, nope]", "nope"),  # the control arm names a VM of the registry
        ("fm.warmup_days=-1", "fm.warmup_days"),
    ],
)
def test_bad_config_fails_at_load_naming_the_field(override, names):
    with pytest.raises(ConfigError, match="invalid config") as e:
        load_config(REPO / "exfm.yaml", overrides=[override], env={})
    assert names in str(e.value)


def test_a_spark_setting_is_one_key_of_spark_conf_and_stays_a_string():
    overrides = [
        "spark.conf.spark.ui.enabled=false",
        "spark.conf.spark.databricks.delta.snapshotPartitions=1",
    ]
    env = {"EXFM__SPARK__CONF__SPARK.SQL.ADAPTIVE.ENABLED": "false"}  # lower-cased, as env keys are
    conf = load_config(REPO / "exfm.yaml", overrides=overrides, env=env).spark.conf
    assert conf["spark.sql.adaptive.enabled"] == "false"
    assert conf["spark.ui.enabled"] == "false"  # not YAML's boolean: Spark takes strings
    assert conf["spark.databricks.delta.snapshotPartitions"] == "1"  # exfm.yaml's "2", replaced
    assert conf["spark.sql.codegen.cache.maxEntries"] == "2000"  # exfm.yaml's other keys stay


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(REPO / "exfm.yaml", overrides=["spark.master"], env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_a_config_for_own_logs_needs_no_demo_settings_emptied_and_gets_every_error_at_once(tmp_path):
    """The demo's synthetic.base_ctr and dense_ranges name VMs and features this registry lacks:
    they do not apply and do not block it. Two registry mistakes are reported together."""
    vm = "{name: shop, categorical: [ad_category], dense: [price], label: purchase}"
    cfg = load_config(REPO / "exfm.yaml", overrides=[f"vms=[{vm}]"], env={})
    assert [v.name for v in cfg.vms] == ["shop"] and cfg.labels == ("purchase",)
    twice = f"vms=[{vm}, {{name: shop, categorical: [price], label: purchase}}]"
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "exfm.yaml", overrides=[twice], env={})
    assert "VM names must be unique" in str(e.value) and "column 'price' is dense" in str(e.value)
