"""Mask the values of a run's ``extra_env`` in the process of every operator that renders them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dtp.params_env import mask_extra_env

if TYPE_CHECKING:
    from collections.abc import Iterable

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

    It masks them in ``_do_render_template_fields``, which both ways of rendering reach: the operator's own
    ``render_template_fields``, and a mapped task's (``MappedOperator.render_template_fields``), which calls it on the
    task it unmaps, never that task's ``render_template_fields``, once the run's params are in the context.
    """

    def _do_render_template_fields(
        self,
        parent: Any,
        template_fields: Iterable[str],
        context: Any,
        jinja_env: jinja2.Environment,
        seen_oids: set[int],
    ) -> None:
        if parent is self:  # not again for each templated object nested in the fields
            mask_extra_env(context["params"])
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)
