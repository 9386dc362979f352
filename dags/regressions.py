"""regression__<recipe>: one scheduled end-to-end regression Airflow DAG per recipe with a ``schedule``.

Generated from include/recipes/*.yaml by dtp.pipeline.factory (reads YAML only).
"""

from dtp.pipeline.factory import regression_dags

globals().update(regression_dags())
