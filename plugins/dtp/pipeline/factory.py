"""Regression DAGs generated from the recipe catalogue: ``regression__<recipe>``.

One DAG per recipe, with the recipe's defaults in its form, so each model size
runs, fails and is backfilled on its own: on the recipe's ``schedule``, or on
demand only where it sets none (``scripts/backfill`` then triggers one run per
date). Generation reads YAML files only. A recipe that does not validate gets no DAG
and an error in the dag-processor's log; the other recipes' DAGs are unaffected
(the recipe unit tests fail on it in CI).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.sdk import DAG
from airflow.sdk.exceptions import AirflowTimetableInvalid

from dtp.form import airflow_params
from dtp.naming import REGRESSION_DAG_PREFIX
from dtp.pipeline.graph import training_pipeline
from dtp.recipes import RECIPE_DIR, Recipe, load_recipe_file

log = logging.getLogger(__name__)
DAG_PREFIX = REGRESSION_DAG_PREFIX


def regression_dag(recipe: Recipe) -> DAG:
    """The regression DAG of ``recipe``: train_e2e's pipeline with the recipe's defaults, on the recipe's schedule
    (none: on demand), one run at a time, backfill runs included."""
    defaults = recipe.defaults.model_dump() | {"recipe": recipe.name}
    when = f"scheduled (`{recipe.schedule}`)" if recipe.schedule else "on-demand (no schedule)"
    with DAG(
        dag_id=f"{DAG_PREFIX}{recipe.name}",
        description=f"End-to-end regression run of {recipe.name}",
        doc_md=(
            f"End-to-end regression run of **{recipe.name}**, {when}: {recipe.description}\n\n"
            "The same pipeline as `train_e2e`, with this recipe's defaults. Gates: the recipe's thresholds and "
            "the median of its recent runs. Backfill with `scripts/backfill`. A run waits in `wait_for_other_runs` "
            "while another run of this DAG (a backfill's beside a scheduled one) holds it."
        ),
        schedule=recipe.schedule,
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,
        params=airflow_params(defaults=defaults, recipes=[recipe.name]),
        tags=["dtp", "regression", recipe.name],
        default_args={"owner": "dtp", "retries": 2, "retry_delay": timedelta(seconds=10)},
    ) as dag:
        training_pipeline(dag, one_run_at_a_time=True)
    return dag


def regression_dags() -> dict[str, DAG]:
    """One regression DAG per recipe, by dag_id."""
    dags = {}
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        try:
            recipe = load_recipe_file(path)
            # Its defaults become the form's: one the form would refuse (num_nodes: 1000) fails the DAG's build.
            dag = regression_dag(recipe)
            # A schedule that is no cron expression or preset: the dag-processor would refuse it as an error of
            # this whole file, and stop scheduling every regression DAG.
            dag.timetable.validate()
        except (ValueError, AirflowTimetableInvalid) as err:  # a RecipeError, a refused default, a bad schedule
            log.error("No regression DAG for %s: %s", path.name, err)
            continue
        dags[dag.dag_id] = dag
    return dags
