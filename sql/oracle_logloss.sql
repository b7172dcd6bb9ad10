-- Oracle LogLoss of one VM's rows of a day (synthetic data only): the generator's true
-- probability of the VM's task as the prediction, the floor any model's NE on these rows can approach.
-- Parameters: :ds :vm :eps (the clip of models/metrics.py); {traffic} is vm_traffic, {truth}
-- the day's truth files; $label is the VM's label column, $truth the task's truth column.
SELECT
  count(*) AS n,
  avg(-(t.$label * ln(greatest(p.$truth, :eps)) + (1 - t.$label) * ln(greatest(1 - p.$truth, :eps)))) AS logloss
FROM {traffic} AS t
JOIN {truth} AS p ON t.request_id = p.request_id
WHERE t.ds = :ds AND t.vm = :vm
