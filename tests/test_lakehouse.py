"""Delta plumbing under concurrency: parallel tasks registering into one small table."""

import threading

from jobs.lakehouse import VM_SNAPSHOTS, render_sql, retry_on_conflict, table_ref


def test_parallel_merges_into_one_table_all_land(spark, cfg):
    """The mapped train_vm tasks of a day upsert vm_snapshots at once: none may fail or be lost."""
    ref = table_ref(cfg, VM_SNAPSHOTS)
    spark.sql(render_sql("vm_snapshots_create", vm_snapshots=ref))
    pairs = [(vm, method) for vm in ("feed", "search", "video") for method in ("ah_sa", "none")]
    barrier, errors = threading.Barrier(len(pairs)), []

    def register(vm, method):
        args = dict.fromkeys(
            ("teacher_snapshot_id", "teacher_trained_through_ds", "n_examples", "train_loss"), None
        )
        args |= {"vm": vm, "method": method, "ds": "2026-01-02", "uri": f"/{vm}/{method}", "sha256": "x"}
        args["hyper_parameters"] = "{}"
        try:
            barrier.wait()
            retry_on_conflict(
                lambda: spark.sql(render_sql("vm_snapshots_upsert", vm_snapshots=ref), args=args),
                what=f"{vm}/{method}",
                attempts=len(pairs) + 1,  # worst case: each loses to every other once
            )
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(str(e)[:600])

    threads = [threading.Thread(target=register, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    rows = spark.read.format("delta").load(cfg.table(VM_SNAPSHOTS)).collect()
    assert sorted((r.vm, r.method) for r in rows) == sorted(pairs)
