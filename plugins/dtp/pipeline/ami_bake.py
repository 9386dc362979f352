# TaskFlow wiring passes XComArgs where the task callables declare plain values: mypy cannot see through it.
# mypy: disable-error-code="arg-type"
"""ami_bake as Airflow tasks:

    validate_params -> family (a task group mapped over the families: bake -> publish)

Each family's ``publish`` waits on its own ``bake`` only: one family's failed bake leaves the
others published, and the run still fails (its ``publish`` ends upstream_failed).

A scheduled run bakes the form's families and every family published before, so the
weekly run keeps each AMI runs use up to date with its source AMI; a published family keeps
the versions of its published AMI (its tags), so the weekly run never undoes a version a
person baked by hand. A run triggered by hand bakes with the form's versions.
``publish`` writes ``/dtp/amis/<family>`` in SSM and an event of the Asset
``dtp-ami://<family>`` (through the ``dtp-amis`` alias) with the AMI id and versions.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.providers.amazon.aws.hooks.ssm import SsmHook
from airflow.sdk import task, task_group
from airflow.sdk.exceptions import AirflowFailException

from dtp.connections import AWS_CONN_ID
from dtp.form_params import ParamsError, parse_params
from dtp.hooks.ami import AmiHook
from dtp.images import ami
from dtp.images.publish import AMI_ALIAS, emit, put_parameter
from dtp.naming import OWNER, TAG_PREFIX, RunNames, expiry, resource_tags, tags_dict
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
    kept_versions: dict[str, dict[str, str]] = {}
    if dag_run.run_type == "scheduled":  # DagRunType.SCHEDULED, a str enum
        published = ami.published_amis(SsmHook(aws_conn_id=AWS_CONN_ID).conn)
        params = params.model_copy(update={"families": sorted({*params.families, *published})})
        log.info(
            "Scheduled run: baking %s (published under %s: %s)", params.families, ami.AMI_PARAMETER_PATH, published
        )
        kept_versions = published_versions(published)
    names = RunNames.from_dag_run(dag_run)
    tags = resource_tags(names, "ami-bake", expiry(params.retain_days * 24))
    return ami.bake_requests(params, tags, kept_versions)


def published_versions(published: dict[str, str]) -> dict[str, dict[str, str]]:
    """The versions each family's published AMI (``published``: family -> AMI id) was baked with, read from its
    tags: what a scheduled run bakes the family with again. The form's default stands in for a version the AMI
    has no tag for or the form refuses now, and for every version of an AMI that is gone."""
    amis = AmiHook(aws_conn_id=AWS_CONN_ID)
    kept = {}
    for family, image_id in published.items():
        image = amis.existing_image(image_id)
        if image is None:
            log.warning("%s: the published AMI %s is gone: baking with the form's versions", family, image_id)
            continue
        versions = ami.tagged_versions(tags_dict(image.get("Tags", [])))
        for name, value in list(versions.items()):
            try:
                parse_params(ami.AmiBakeParams, {name: value})
            except ParamsError as err:
                log.warning("%s: not keeping %s of %s, the form refuses it now (%s)", family, name, image_id, err)
                del versions[name]
        untagged = sorted(ami.default_versions().keys() - versions.keys())
        log.info(
            "%s: keeping the versions of the published AMI %s: %s%s",
            family,
            image_id,
            ", ".join(f"{name}={value}" for name, value in sorted(versions.items())),
            f"; the form's for {', '.join(untagged)}" if untagged else "",
        )
        kept[family] = versions
    return kept


@task(outlets=[AMI_ALIAS], map_index_template="{{ task.op_kwargs['baked']['variables']['family'] }}")
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


@task_group(group_id="family")
def bake_and_publish(
    var_file: str,
    variables: dict[str, str],
    name_prefix: str,
    fingerprint_paths: list[str],
    tags: dict[str, str],
    builder_tags: dict[str, str],
    source_ami: dict[str, str],
) -> None:
    """Bake one family's AMI (a bake request of ``ami.bake_requests``) and publish it."""
    baked = PackerBuildOperator(
        task_id="bake",
        **ami.COMMON_BAKE_ARGUMENTS,
        var_file=var_file,
        variables=variables,
        name_prefix=name_prefix,
        fingerprint_paths=fingerprint_paths,
        tags=tags,
        builder_tags=builder_tags,
        source_ami=source_ami,
        aws_conn_id=AWS_CONN_ID,
        map_index_template="{{ task.variables['family'] }}",
    )
    publish(baked=baked.output)


def ami_bake_pipeline() -> None:
    """Add ami_bake's tasks to the DAG being defined (call inside ``with DAG(...):``)."""
    bake_and_publish.expand_kwargs(validate_params())
