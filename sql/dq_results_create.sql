-- Data-quality results (jobs/quality.py): one row per (ds, table, suite), the latest validation.
-- failed_rules: one line per failed expectation (table, column, rule, observed value);
-- observed: JSON of the aggregate values GX observed (row count, label means, ...).
CREATE TABLE IF NOT EXISTS $dq_results (
  ds STRING NOT NULL,
  `table` STRING NOT NULL,
  suite STRING NOT NULL,
  success BOOLEAN NOT NULL,
  expectations INT NOT NULL,
  `rows` BIGINT NOT NULL,
  failed_rules ARRAY<STRING> NOT NULL,
  observed STRING NOT NULL,
  data_docs STRING NOT NULL,
  quarantine STRING,
  validated_at TIMESTAMP NOT NULL
) USING delta
PARTITIONED BY (ds)
