"""Mask the values of a run's ``extra_env`` in the process of every operator that renders them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtp.params_env import mask_extra_env

if TYPE_CHECKING:
    import jinja2
    from airflow.sdk import BaseOperator

    _Operator = BaseOperator
else:
    _Operator = object


class ExtraEnvMaskingMixin(_Operator):
    """
    Mask the values of the run's ``extra_env`` (tokens, some) in this process before the templated fields render.

    A retry's worker never saw validate_params mask them, so without this the Rendered Template tab (the spec, a
    job's env list) and the task's log (a provider's log of the job it submits) would show them. List it before the
    operator class: ``class SaveCheckpointOperator(ExtraEnvMaskingMixin, BaseOperator)``.

    It hooks ``render_template_fields``, which a mapped task (``.expand()``) never calls on the task it unmaps: a
    mapped operator would need ``SpecTaskOperator``'s hook (``dtp.pipeline.spec_tasks``) instead.
    """

    def render_template_fields(self, context: Any, jinja_env: jinja2.Environment | None = None) -> None:
        mask_extra_env(context["params"])
        super().render_template_fields(context, jinja_env)
