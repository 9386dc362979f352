"""CloudFormation stacks that a retry finds again instead of creating twice.

Extends the amazon provider's ``CloudFormationHook`` (which has create and
delete but neither idempotency nor outputs) with ``ensure_stack``,
``stack_outputs`` and a delete that waits and reports DELETE_FAILED.
"""

from __future__ import annotations

import time
from typing import Any

from airflow.providers.amazon.aws.hooks.cloud_formation import CloudFormationHook
from botocore.exceptions import ClientError

from dtp.naming import aws_tags

REUSABLE = {"CREATE_COMPLETE", "CREATE_IN_PROGRESS", "UPDATE_COMPLETE", "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"}
BROKEN = {"CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED", "ROLLBACK_IN_PROGRESS"}


class StackFailed(RuntimeError):
    """A stack reached a failed state; the message carries CloudFormation's own reasons."""


class StackHook(CloudFormationHook):
    """Idempotent create, outputs, and verified delete of CloudFormation stacks."""

    def describe(self, name: str) -> dict[str, Any] | None:
        try:
            stacks = self.conn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as err:
            if "does not exist" in str(err):
                return None
            raise
        return stacks[0] if stacks else None

    def ensure_stack(
        self, name: str, template_body: str, parameters: dict[str, str], tags: dict[str, str]
    ) -> dict[str, Any]:
        """Create the stack unless a healthy one of that name exists; replace a failed one."""
        stack = self.describe(name)
        if stack and stack["StackStatus"] in REUSABLE:
            self.log.info("Stack %s exists (%s): reusing it", name, stack["StackStatus"])
            return stack
        if stack and stack["StackStatus"] in BROKEN:
            self.log.warning("Stack %s is %s: deleting it before creating it again", name, stack["StackStatus"])
            self.delete_and_wait(name)
        self.log.info("Creating stack %s", name)
        self.conn.create_stack(
            StackName=name,
            TemplateBody=template_body,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Tags=aws_tags(tags),
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
            OnFailure="DELETE",
        )
        return self.describe(name) or {}

    def stack_outputs(self, name: str) -> dict[str, str]:
        stack = self.describe(name)
        if stack is None:
            raise StackFailed(f"stack {name} does not exist")
        if stack["StackStatus"] not in REUSABLE - {"CREATE_IN_PROGRESS"}:
            raise StackFailed(f"stack {name} is {stack['StackStatus']}: {self.failure_reasons(name)}")
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    def failure_reasons(self, name: str) -> str:
        try:
            events = self.conn.describe_stack_events(StackName=name)["StackEvents"]
        except ClientError:
            return "no events"
        reasons = [
            f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
            for e in events
            if e.get("ResourceStatus", "").endswith("FAILED")
        ]
        return "; ".join(reasons[:5]) or "no failure events"

    def delete_and_wait(self, name: str, timeout: float = 1800, poll: float = 10) -> str:
        """Delete the stack and wait; return the final status ("DELETE_COMPLETE" when gone).

        A DELETE_FAILED stack is returned as such, for the caller to clean up what
        blocked it and call again. A delete the service rejects outright (seen as
        DependencyViolation on some emulators) is treated the same way.
        """
        stack = self.describe(name)
        if stack is None:
            return "DELETE_COMPLETE"
        stack_id = stack["StackId"]
        try:
            self.conn.delete_stack(StackName=stack_id)
        except ClientError as err:
            self.log.warning("DeleteStack %s was refused: %s", name, err)
            return "DELETE_FAILED"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.describe(stack_id)
            status = current["StackStatus"] if current else "DELETE_COMPLETE"
            if status in ("DELETE_COMPLETE", "DELETE_FAILED"):
                return status
            time.sleep(poll)
        raise StackFailed(f"stack {name} still deleting after {timeout:.0f}s")
