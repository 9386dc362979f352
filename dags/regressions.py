"""regression__<recipe>: one end-to-end regression Airflow DAG per recipe, on its ``schedule`` or on demand.

Generated from include/recipes/*.yaml by dtp.pipeline.factory (reads YAML only).
"""

from dtp.pipeline.factory import regression_dags

globals().update(regression_dags())
