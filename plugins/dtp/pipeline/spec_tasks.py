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

from dtp.operators.masking import ExtraEnvMaskingMixin

if TYPE_CHECKING:
    from airflow.sdk.bases.decorator import TaskDecorator


class SpecTaskOperator(ExtraEnvMaskingMixin, _PythonDecoratedOperator):
    """The operator of a ``@spec_task``: ``@task``'s (the standard provider's decorated PythonOperator), masking the
    run's ``extra_env`` values in its process before its arguments are rendered (``ExtraEnvMaskingMixin``, mapped
    or not), so neither the Rendered Template tab nor its log (a returned PyTorchJob manifest's env list, say) shows
    them."""


def spec_task(**kwargs: Any) -> TaskDecorator:
    """``@task(...)`` (same arguments) for a callable that takes the run spec, its ``extra_env`` values masked."""
    return task_decorator_factory(decorated_operator_class=SpecTaskOperator, **kwargs)
