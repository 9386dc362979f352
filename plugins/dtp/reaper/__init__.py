"""Find and delete what runs left behind past their ``dtp:expires-at`` tag.

The safety net under teardown: a teardown that itself failed, a run with
``keep_cluster=true``, or a worker that died mid-run leaves tagged resources;
the scheduled ``reaper`` DAG finds them by tag (run directories on the shared
filesystem by their ``run.json`` marker, and the directories runs share there,
dataset mirrors and unpacked images, by their leases; never by a local record) and
deletes them with the same dependency-ordered sweep teardown uses (HyperPod
clusters, ParallelCluster clusters and Batch compute environments first,
waited on until gone: their nodes sit in the run's subnets). One resource
that cannot be deleted, or one kind that cannot be looked for, does not stop
the others: the task fails at the end, naming each, and its retry or the next
sweep finds them again. Nothing of a DAG run still queued or running is
deleted, whatever its expiry: a run cleared or retried after it recreates its
resources with the expiry its ``validate_params`` fixed, and they are in use.

Its modules: ``expired`` (what a finder returns, and when a resource has
expired), ``aws`` and ``cluster`` (the finders of the AWS account, and of the
Slurm cluster and the worker's mount), ``amis`` (the AWS account's AMIs, less
those a run may still boot), ``pytorchjobs`` (the finder of the PyTorchJobs on
the EKS clusters runs train on), ``pushgateway`` (the finder of the runs' groups
on the Prometheus Pushgateway, past a retention from their last push rather than
a tag), ``active_runs`` (what a queued or running DAG run keeps) and ``deletion``
(``reap``).
"""
