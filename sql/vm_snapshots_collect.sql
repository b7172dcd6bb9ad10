-- Forget the VM snapshots maintenance collects, before their files go (so none resolves).
-- Parameters: :keys (array of "vm/method/ds")
DELETE FROM $vm_snapshots
WHERE array_contains(:keys, concat_ws('/', vm, method, ds))
