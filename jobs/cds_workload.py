"""The work of a driver whose loaded classes become the class-data archive (``spark.class_archive``).

Run by ``jobs.spark._dump_class_archive`` through spark-submit: what the jobs do to a Delta table
(partitioned write, replaceWhere, MERGE, history, time travel, aggregate, sort, Arrow both ways),
so the classes they need are the ones archived. Needs only pyspark and delta-spark.
"""

import sys

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

spark = SparkSession.builder.getOrCreate()
path = sys.argv[1]
rows = spark.range(2000).select(
    (F.col("id") % 4).cast("string").alias("ds"),
    F.col("id").cast("string").alias("request_id"),
    (F.rand(1) < 0.1).cast("int").alias("click"),
    F.rand(2).alias("score"),
    F.timestamp_seconds(F.col("id")).alias("event_ts"),
)
rows.write.format("delta").partitionBy("ds").save(path)
rows.where(F.col("ds") == "1").write.format("delta").mode("overwrite").option(
    "replaceWhere", "ds = '1'"
).save(path)
table = DeltaTable.forPath(spark, path)
changed = rows.where(F.col("ds") == "2").withColumn("click", F.lit(1))
(
    table.alias("t")
    .merge(changed.alias("s"), "t.ds = s.ds AND t.request_id = s.request_id")
    .whenMatchedUpdateAll()
    .whenNotMatchedInsertAll()
    .execute()
)
table.history().collect()
day = spark.read.format("delta").option("versionAsOf", 1).load(path).where(F.col("ds") == "2")
day.inputFiles()
day.groupBy("ds").agg(F.avg("click"), F.count("*")).collect()
day.orderBy("event_ts", "request_id").toArrow()
day.mapInArrow(lambda batches: batches, day.schema).count()
spark.stop()
