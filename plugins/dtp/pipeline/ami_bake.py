# TaskFlow wiring passes XComArgs where the task callables declare plain values: mypy cannot see through it.
# mypy: disable-error-code="arg-type"
"""ami_bake as Airflow tasks:

    validate_params -> bake (one mapped PackerBuildOperator per family) -> publish (mapped)

A scheduled run bakes the form's families and every family published before, so the
weekly run keeps each AMI runs use up to date with its source AMI.
``publish`` writes ``/dtp/amis/<family>`` in SSM and an event of the Asset
``dtp-ami://<family>`` (through the ``dtp-amis`` alias) with the AMI id and versions.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from dtp.connections import AWS_CONN_ID
from dtp.form_params import ParamsError, parse_params
from dtp.images import ami
from dtp.images.publish import AMI_ALIAS, emit, put_parameter
from dtp.naming import OWNER, TAG_PREFIX, RunNames, expiry, resource_tags
from dtp.operators.packer import PackerBuildOperator

log = logging.getLogger(__name__)


@task
def validate_params(**context: Any) -> list[dict[str, Any]]:
    """Refuse bad input before packer starts; return one bake request per family (on a scheduled run, also one
    per family published under ``/dtp/amis/``)."""
    dag_run = context["dag_run"]
    try:
        params = parse_params(ami.AmiBakeParams, {**context["params"], **(dag_run.conf or {})})
    except ParamsError as err:
        raise AirflowFailException(str(err)) from None
    if dag_run.run_type == "scheduled":  # DagRunType.SCHEDULED, a str enum
        published = ami.published_families(SsmHook(aws_conn_id=AWS_CONN_ID).conn)
        params = params.model_copy(update={"families": sorted({*params.families, *published})})
        log.info(
            "Scheduled run: baking %s (published under %s: %s)", params.families, ami.AMI_PARAMETER_PATH, published
        )
    names = RunNames.from_dag_run(dag_run)
    return ami.bake_requests(params, resource_tags(names, "ami-bake", expiry(params.retain_days * 24)))


@task(outlets=[AMI_ALIAS], map_index_template="{{ baked['variables']['family'] }}")
def publish(baked: dict[str, Any], *, outlet_events: Any = None) -> dict[str, Any]:
    """Point ``/dtp/amis/<family>`` at the AMI and record an Asset event with its versions."""
    family = baked["variables"]["family"]
    parameter = ami.ssm_parameter(family)
    version = put_parameter(parameter, baked["ami_id"], f"DTP {family} AMI", {f"{TAG_PREFIX}owner": OWNER}, AWS_CONN_ID)
    extra = {"ami_id": baked["ami_id"], "ami_name": baked["ami_name"], "ssm_parameter": parameter, **baked["variables"]}
    emit(outlet_events, AMI_ALIAS, f"ami/{family}", ami.asset_uri(family), extra)
    log.info(
        "%s -> %s (parameter version %s; %s)",
        parameter,
        baked["ami_id"],
        version,
        "baked" if baked["built"] else "reused",
    )
    return {**extra, "parameter_version": version}


def ami_bake_pipeline() -> None:
    """Add ami_bake's tasks to the DAG being defined (call inside ``with DAG(...):``)."""
    requests = validate_params()
    baked = PackerBuildOperator.partial(
        task_id="bake",
        template=str(ami.TEMPLATE),
        aws_conn_id=AWS_CONN_ID,
        map_index_template="{{ task.variables['family'] }}",
    ).expand_kwargs(requests)
    publish.expand(baked=baked.output)
