"""The synthetic traffic has the properties DESIGN.md §6 promises (pure numpy/pyarrow, no Spark)."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from jobs import generate
from tests.conftest import tiny_config


def _digest(root):
    """sha256 of every file under root, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _landing(cfg, ds, vm):
    return pd.read_parquet(f"{cfg.landing}/ds={ds}/vm={vm}")


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = tiny_config(tmp_path / name, f"seeds.synthetic={seed}")
        generate.run("2026-01-02", cfg)
        runs[name] = _digest(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"].keys() == runs["c"].keys()
    assert runs["a"] != runs["c"]


def test_rerun_replaces_the_day(tmp_path):
    cfg = tiny_config(tmp_path)
    generate.run("2026-01-01", cfg)
    first = _digest(tmp_path / "landing")
    generate.run("2026-01-01", cfg)
    assert _digest(tmp_path / "landing") == first
    assert not list((tmp_path / "landing").glob("_tmp*"))


def test_landing_files_follow_the_contract_and_truth_is_separate(tmp_path):
    cfg = tiny_config(tmp_path)
    out = generate.run("2026-01-01", cfg)
    for vm in cfg.vms:
        files = sorted((tmp_path / "landing" / "ds=2026-01-01" / f"vm={vm.name}").glob("*.parquet"))
        assert len(files) == 2  # rows_per_file=1000 of 1500
        df = _landing(cfg, "2026-01-01", vm.name)
        assert list(df.columns) == ["request_id", "event_ts", "user_id", "ad_id", *vm.features, vm.label]
        assert len(df) == out["rows"][vm.name]
        assert df["event_ts"].dt.date.astype(str).eq("2026-01-01").all()
        assert df["event_ts"].is_monotonic_increasing  # arrival order
        assert set(df[vm.label].unique()) <= {0, 1}
        assert df.duplicated("request_id").any()  # duplicated log lines for ingest to drop
    truth = pd.read_parquet(tmp_path / "truth" / "ds=2026-01-01")
    assert len(truth) == cfg.synthetic.rows_per_day and truth["request_id"].is_unique
    assert truth["p_click"].between(0, 1, inclusive="neither").all()
    # Labels are drawn from the true probabilities.
    assert abs(truth["click"].mean() - truth["p_click"].mean()) < 0.02


def test_vms_share_users_ads_and_requests_but_not_base_ctr(tmp_path):
    cfg = tiny_config(tmp_path, "synthetic.rows_per_day=30000", "synthetic.rows_per_file=30000")
    out = generate.run("2026-01-01", cfg)
    views = {vm.name: _landing(cfg, "2026-01-01", vm.name) for vm in cfg.vms}
    feed, search = views["feed"], views["search"]
    assert len(set(feed.user_id) & set(search.user_id)) > 0.5 * feed.user_id.nunique()
    assert len(set(feed.ad_id) & set(search.ad_id)) > 0.5 * feed.ad_id.nunique()
    shared = set(feed.request_id) & set(search.request_id)
    assert len(shared) > 0.03 * len(feed)
    # A shared request is one impression: one (user, ad, label), each VM with its own features.
    both = feed.drop_duplicates("request_id").merge(search.drop_duplicates("request_id"), on="request_id")
    assert (both.user_id_x == both.user_id_y).all() and (both.click_x == both.click_y).all()
    assert (both.ad_category_x == both.ad_category_y).all()  # same meaning, same value
    # Cross-domain bias: base CTRs differ clearly (search > feed > video by the config).
    ctr = out["ctr"]
    assert ctr["search"] > ctr["feed"] * 1.2 > ctr["video"] * 1.2 * 1.2


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_base_ctr_stays_at_its_configured_value_while_the_world_drifts(tmp_path, seed):
    """Mean-reverting drift: over three months, every VM's mean true CTR stays within ±20% of base_ctr."""
    rows = ("synthetic.rows_per_day=6000", "synthetic.rows_per_file=6000")
    cfg = tiny_config(tmp_path, *rows, f"seeds.synthetic={seed}")
    for day in pd.date_range("2026-01-01", periods=10, freq="9D").date:  # a random walk would be gone by then
        generate.run(day, cfg)
        truth = pd.read_parquet(f"{cfg.truth}/ds={day}")
        for vm, p_click in truth.groupby("home_vm")["p_click"]:
            want = cfg.synthetic.base_ctr[vm]
            assert abs(p_click.mean() / want - 1) < 0.2, (seed, str(day), vm, p_click.mean(), want)


def test_users_and_ads_churn_every_day(tmp_path):
    cfg = tiny_config(tmp_path)
    for ds in ("2026-01-01", "2026-01-02"):
        generate.run(ds, cfg)
    d1, d2 = (_landing(cfg, ds, "feed") for ds in ("2026-01-01", "2026-01-02"))
    new_users = set(d2.user_id) - set(d1.user_id)
    assert new_users and set(d2.user_id) & set(d1.user_id)
    # New ids come from the window's new end, old ones leave from its start.
    assert max(int(u[1:]) for u in d2.user_id) > max(int(u[1:]) for u in d1.user_id)


def _features(df: pd.DataFrame, vm) -> pd.DataFrame:
    ids = df[[*vm.categorical, "user_id", "ad_id"]].astype(str)
    return pd.concat([ids, df[list(vm.dense)]], axis=1)


def test_drift_makes_a_frozen_model_worse_every_day(tmp_path):
    """A logistic model fit on day 1 has a worse NE on day 5 than on day 2 (freshness gap)."""
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    cfg = tiny_config(
        tmp_path,
        "synthetic.rows_per_day=60000",
        "synthetic.rows_per_file=60000",
        "synthetic.users=3000",
        "synthetic.ads=600",
    )
    days = ["2026-01-01", "2026-01-02", "2026-01-05"]
    for ds in days:
        generate.run(ds, cfg)
    vm = cfg.vm("feed")
    train, day2, day5 = (_landing(cfg, ds, vm.name).drop_duplicates("request_id") for ds in days)
    model = make_pipeline(
        make_column_transformer(
            (OneHotEncoder(handle_unknown="ignore", min_frequency=3), [*vm.categorical, "user_id", "ad_id"]),
            (StandardScaler(), list(vm.dense)),
        ),
        LogisticRegression(C=0.3, max_iter=300),
    ).fit(_features(train, vm), train[vm.label])
    base = train[vm.label].mean()
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))

    def ne(df):
        return log_loss(df[vm.label], model.predict_proba(_features(df, vm))[:, 1]) / entropy

    def oracle_ne(df, ds):
        p_true = pd.read_parquet(f"{cfg.truth}/ds={ds}").set_index("request_id").loc[df.request_id, "p_click"]
        return log_loss(df[vm.label], p_true) / entropy

    ne2, ne5 = ne(day2), ne(day5)
    assert ne2 < 1.0  # the model learned something that carries over a day
    assert ne5 > ne2 + 0.02, (ne2, ne5)
    # Not just a harder day: the gap to the true click model grows too.
    assert ne5 - oracle_ne(day5, days[2]) > ne2 - oracle_ne(day2, days[1]) + 0.01


def test_what_a_vm_sees_does_not_change_the_oracle(tmp_path):
    """The registry decides which columns each VM logs, not the true click model: video logging
    user_segment (the default) or not leaves every true probability as it is."""
    seen = tiny_config(tmp_path / "seen")
    assert "user_segment" in seen.vm("video").categorical
    unseen = tiny_config(
        tmp_path / "unseen", "vms.2.categorical=[ad_category, advertiser_id, device, hour_bucket]"
    )
    for cfg in (seen, unseen):
        generate.run("2026-01-03", cfg)
    a, b = (pd.read_parquet(f"{cfg.truth}/ds=2026-01-03") for cfg in (seen, unseen))
    pd.testing.assert_frame_equal(a, b)
    assert "user_segment" in _landing(seen, "2026-01-03", "video") and "user_segment" not in _landing(
        unseen, "2026-01-03", "video"
    )


def test_a_task_vm_gets_a_correlated_truth_and_leaves_the_click_world_as_it_is(tmp_path):
    """Paper Table 5: video's label becomes a like. Every click truth and label stays as it was, the
    like truth follows part of the click's structure, and video's like rate is its base rate."""
    clicks = tiny_config(tmp_path / "clicks", "synthetic.rows_per_day=6000", "synthetic.rows_per_file=6000")
    tasks = tiny_config(
        tmp_path / "tasks",
        "synthetic.rows_per_day=6000",
        "synthetic.rows_per_file=6000",
        "vms.2.label=like",
        "vms.2.task=like",
    )
    for cfg in (clicks, tasks):
        generate.run("2026-01-03", cfg)
    a, b = (pd.read_parquet(f"{cfg.truth}/ds=2026-01-03") for cfg in (clicks, tasks))
    pd.testing.assert_frame_equal(a, b[a.columns])
    assert "p_like" not in a and b["p_like"].between(0, 1, inclusive="neither").all()
    assert 0.2 < np.corrcoef(np.log(b["p_click"]), np.log(b["p_like"]))[0, 1] < 0.95  # related, not the same
    video = b[b["home_vm"] == "video"]
    assert abs(video["p_like"].mean() / tasks.synthetic.base_ctr["video"] - 1) < 0.2
    # video logs the like, feed still the click of the same requests.
    landed = _landing(tasks, "2026-01-03", "video")
    assert "like" in landed and "click" not in landed and set(landed["like"]) == {0, 1}
    pd.testing.assert_frame_equal(
        _landing(clicks, "2026-01-03", "feed"), _landing(tasks, "2026-01-03", "feed")
    )
    with pytest.raises(ValueError, match="label 'like' is task 'like' in one VM and 'follow'"):
        tiny_config(tmp_path, "vms.1.label=like", "vms.1.task=like", "vms.2.label=like", "vms.2.task=follow")


def test_rejects_unknown_features_and_days_before_start(tmp_path):
    with pytest.raises(ValueError, match="cannot make features"):
        generate.run("2026-01-01", tiny_config(tmp_path, "vms.0.dense.0=mystery"))
    with pytest.raises(ValueError, match="before synthetic.start_date"):
        generate.run("2025-12-31", tiny_config(tmp_path))
