"""The connection and queue every DTP task uses unless told otherwise: one place, and nothing imported, so a DAG
file reads them at no cost."""

AWS_CONN_ID = "aws_default"
# Under CeleryExecutor the tasks that submit cluster jobs or touch the cluster's shared filesystem have their own
# workers, where it is mounted or over ssh (other executors ignore queues).
TRAINING_QUEUE = "training"
