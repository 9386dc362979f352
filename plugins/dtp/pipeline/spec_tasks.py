"""``@spec_task``: the ``@task`` of the callables that take a run spec, which mask the run's ``extra_env`` values.

The secrets masker hides a value by its name only in a mapping (``{"HF_TOKEN": ...}``), and only in the process
that was told to: a task's worker never saw validate_params mask the values, and its Rendered Template tab (the spec
among its arguments) is saved before its callable runs. So each such task masks them before its arguments render,
mapped (``.expand()``) or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk.bases.decorator import task_decorator_factory

from dtp.params_env import mask_extra_env

if TYPE_CHECKING:
    from collections.abc import Iterable

    import jinja2
    from airflow.sdk.bases.decorator import TaskDecorator


class SpecTaskOperator(_PythonDecoratedOperator):
    """The operator of a ``@spec_task``: ``@task``'s (the standard provider's decorated PythonOperator), masking the
    run's ``extra_env`` values in its process before its arguments are rendered, so neither the Rendered Template
    tab nor its log (a returned PyTorchJob manifest's env list, say) shows them.

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
        if parent is self:  # not again for each templated object nested in the arguments
            mask_extra_env(context["params"])
        super()._do_render_template_fields(parent, template_fields, context, jinja_env, seen_oids)


def spec_task(**kwargs: Any) -> TaskDecorator:
    """``@task(...)`` (same arguments) for a callable that takes the run spec, its ``extra_env`` values masked."""
    return task_decorator_factory(decorated_operator_class=SpecTaskOperator, **kwargs)
