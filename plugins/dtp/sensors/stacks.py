"""Wait for a CloudFormation stack to be created: the provider's sensor, failing with CloudFormation's reasons."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from airflow.providers.amazon.aws.sensors.cloud_formation import CloudFormationCreateStackSensor
from airflow.sdk.exceptions import AirflowFailException

from dtp.hooks.stacks import StackFailed, StackHook

if TYPE_CHECKING:
    from airflow.sdk import Context


class StackCreatedSensor(CloudFormationCreateStackSensor):
    """The provider's sensor for a created stack, failing at once (no retry) on a stack that is not being created.

    The provider's sensor raises "in bad state" without a cause on a failed stack and
    pokes until its timeout when the stack does not exist (as after ``OnFailure=DELETE``);
    this one fails the task with CloudFormation's failure reasons in either case.
    """

    aws_hook_class = StackHook

    def poke(self, context: Context) -> bool:
        try:
            return cast("StackHook", self.hook).created(self.stack_name)
        except StackFailed as err:
            raise AirflowFailException(str(err)) from None
