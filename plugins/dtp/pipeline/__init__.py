"""The pipelines: plain step functions (``spec``, ``network``, ``data``, ``jobs``, ``frameworks``, ``checkpoints``,
``results``) and their wiring into Airflow tasks: ``graph`` (training, built once per DAG by ``factory``),
``validation`` (validate_cluster), ``ami_bake`` and ``container_build``."""
