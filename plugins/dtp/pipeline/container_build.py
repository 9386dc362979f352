# TaskFlow wiring passes XComArgs where the task callables declare plain values: mypy cannot see through it.
# mypy: disable-error-code="arg-type,index"
"""container_build as Airflow tasks:

    validate_params -> build (ContainerImageBuildOperator) -> publish

``publish`` tags the image ``published-<platform>`` (which the ECR lifecycle policy
keeps), writes the digest-pinned reference to ``/dtp/images/<platform>/<image>``
in SSM (``.../training`` for ``local-cpu``; train_e2e's resolve_images reads the one
the run needs) and an event of the image's Asset.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from dtp.connections import AWS_CONN_ID
from dtp.form_params import ParamsError, parse_params
from dtp.hooks.registry import ContainerRegistryHook, published_tag
from dtp.images.container import ContainerBuildParams, training_parameter
from dtp.images.publish import IMAGE_ALIAS, emit, put_parameter
from dtp.naming import OWNER, TAG_PREFIX
from dtp.operators.container import ContainerImageBuildOperator

log = logging.getLogger(__name__)


@task
def validate_params(**context: Any) -> dict[str, Any]:
    """Refuse bad input before anything is built; return the build request and where to publish."""
    try:
        params = parse_params(ContainerBuildParams, {**context["params"], **(context["dag_run"].conf or {})})
    except ParamsError as err:
        raise AirflowFailException(str(err)) from None
    return {**params.build_request(), "platform": params.platform, "image_name": params.image}


@task(outlets=[IMAGE_ALIAS])
def publish(request: dict[str, Any], built: dict[str, Any], *, outlet_events: Any = None) -> dict[str, Any]:
    """Tag the image as the platform's published one, point the image's SSM parameter
    (``/dtp/images/<platform>/<image>``) at it and record an Asset event."""
    registry = ContainerRegistryHook()
    # Before SSM names it, so the image runs read there is one the lifecycle policy keeps.
    registry.tag_image(request["repository"], built["digest"], published_tag(request["platform"]))
    parameter = training_parameter(request["platform"], request["image_name"])
    version = put_parameter(
        parameter, built["image"], f"DTP {request['image_name']} image", {f"{TAG_PREFIX}owner": OWNER}, AWS_CONN_ID
    )
    extra = {
        "image": built["image"],
        "digest": built["digest"],
        "ssm_parameter": parameter,
        "build_args": built["build_args"],
    }
    uri = f"oci://{registry.registry}/{request['repository']}"
    emit(outlet_events, IMAGE_ALIAS, f"image/{request['image_name']}", uri, extra)
    log.info(
        "%s -> %s (parameter version %s; %s)",
        parameter,
        built["image"],
        version,
        "built" if built["built"] else "reused",
    )
    return {**extra, "parameter_version": version}


def container_build_pipeline() -> None:
    """Add container_build's tasks to the DAG being defined (call inside ``with DAG(...):``)."""
    request = validate_params()
    build = ContainerImageBuildOperator(
        task_id="build",
        context_dir=request["context_dir"],
        dockerfile=request["dockerfile"],
        repository=request["repository"],
        build_args=request["build_args"],
        labels=request["labels"],
    )
    publish(request, build.output)
