"""CloudFormation stacks that a retry finds again instead of creating twice.

Extends the amazon provider's ``CloudFormationHook`` (which has create and
delete but neither idempotency nor outputs) with ``ensure_stack``,
``stack_outputs``, ``created`` (for ``dtp.sensors.stacks.StackCreatedSensor``)
and a delete that waits and reports DELETE_FAILED.

Stacks are created with ``OnFailure=ROLLBACK``: a stack that fails stays (in
ROLLBACK_COMPLETE) with its events, so the reasons can be read; teardown
deletes it, and ``ensure_stack`` deletes and creates it again on a retry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from airflow.providers.amazon.aws.hooks.cloud_formation import CloudFormationHook
from botocore.exceptions import ClientError

from dtp.naming import aws_tags

REUSABLE = {"CREATE_COMPLETE", "CREATE_IN_PROGRESS", "UPDATE_COMPLETE", "UPDATE_COMPLETE_CLEANUP_IN_PROGRESS"}
READY = REUSABLE - {"CREATE_IN_PROGRESS"}
# Deleted and created again by ensure_stack (after a failed create: ROLLBACK_COMPLETE, or CREATE_FAILED when
# rollback was disabled).
BROKEN = {"CREATE_FAILED", "ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "DELETE_FAILED"}
# Waited out before anything else is done with the stack: CloudFormation refuses a create of the same name while
# one is deleted (AlreadyExistsException) and is still removing what it created while one rolls back.
SETTLING = {"ROLLBACK_IN_PROGRESS", "DELETE_IN_PROGRESS"}


class StackFailed(RuntimeError):
    """A stack reached a failed state; the message carries CloudFormation's own reasons."""


class StackHook(CloudFormationHook):
    """Idempotent create, outputs, and verified delete of CloudFormation stacks."""

    def describe(self, name: str) -> dict[str, Any] | None:
        """The stack (by name, or by id: a deleted one then is DELETE_COMPLETE), None when there is none."""
        try:
            stacks = self.conn.describe_stacks(StackName=name)["Stacks"]
        except ClientError as err:
            if "does not exist" in str(err):
                return None
            raise
        return stacks[0] if stacks else None

    def ensure_stack(
        self,
        name: str,
        template_body: str,
        parameters: dict[str, str],
        tags: dict[str, str],
        *,
        timeout: float = 1800,
        poll: float = 10,
    ) -> dict[str, Any]:
        """Create the stack unless a healthy one of that name exists; replace a failed one.

        A stack still rolling back or being deleted is waited for first; a failed one
        (its reasons logged) is deleted and waited for before the new create.
        """
        stack = self.describe(name)
        if stack and stack["StackStatus"] in SETTLING:
            self.log.info("Stack %s is %s: waiting for it to end before creating it", name, stack["StackStatus"])
            self._wait(stack["StackId"], lambda status: status not in SETTLING, timeout, poll)
            stack = self.describe(name)
        status = stack["StackStatus"] if stack else None
        if stack and status in REUSABLE:
            self.log.info("Stack %s exists (%s): reusing it", name, status)
            return stack
        if stack and status in BROKEN:
            self.log.warning(
                "Stack %s is %s (%s): deleting it before creating it again", name, status, self.failure_reasons(name)
            )
            deleted = self.delete_and_wait(name, timeout, poll)
            if deleted != "DELETE_COMPLETE":
                raise StackFailed(f"stack {name} is {status} and could not be deleted: {self.failure_reasons(name)}")
        elif stack:
            raise StackFailed(f"stack {name} is {status}: neither reusable nor one that a create replaces")
        self.log.info("Creating stack %s", name)
        self.conn.create_stack(
            StackName=name,
            TemplateBody=template_body,
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Tags=aws_tags(tags),
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"],
            # Not DELETE: a stack deleted on failure takes its events (the reasons) with it, and a retry's create
            # meets it in DELETE_IN_PROGRESS.
            OnFailure="ROLLBACK",
        )
        return self.describe(name) or {}

    def created(self, name: str) -> bool:
        """True once the stack is created, False while it is being created; StackFailed (with CloudFormation's
        reasons) for any other state, a missing stack included."""
        stack = self.describe(name)
        if stack is None:
            raise StackFailed(f"stack {name} does not exist (deleted?): {self.failure_reasons(name)}")
        status = stack["StackStatus"]
        if status in READY:
            return True
        if status == "CREATE_IN_PROGRESS":
            return False
        why = f" ({stack['StackStatusReason']})" if stack.get("StackStatusReason") else ""
        raise StackFailed(f"stack {name} is {status}{why}: {self.failure_reasons(name)}")

    def stack_outputs(self, name: str) -> dict[str, str]:
        stack = self.describe(name)
        if stack is None:
            raise StackFailed(f"stack {name} does not exist")
        if stack["StackStatus"] not in READY:
            raise StackFailed(f"stack {name} is {stack['StackStatus']}: {self.failure_reasons(name)}")
        return {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}

    def failure_reasons(self, name: str, limit: int = 5) -> str:
        """The failed resources of the stack's events, oldest (the cause) first.

        A stack that no longer exists is read by the id of the newest deleted stack of
        that name (CloudFormation keeps deleted stacks' events for 90 days).
        """
        try:
            events = self._events(name)
        except ClientError as err:
            if "does not exist" not in str(err):
                return f"no events ({err})"
            stack_id = self._deleted_stack_id(name)
            if stack_id is None:
                return "no events"
            events = self._events(stack_id)
        reasons = [
            f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
            for e in reversed(events)
            if e.get("ResourceStatus", "").endswith("FAILED")
        ]
        return "; ".join(reasons[:limit]) or "no failure events"

    def _events(self, name_or_id: str) -> list[dict[str, Any]]:
        pages = self.conn.get_paginator("describe_stack_events").paginate(StackName=name_or_id)
        return [event for page in pages for event in page["StackEvents"]]

    def _deleted_stack_id(self, name: str) -> str | None:
        newest: dict[str, Any] | None = None
        for page in self.conn.get_paginator("list_stacks").paginate(StackStatusFilter=["DELETE_COMPLETE"]):
            for summary in page["StackSummaries"]:
                if summary["StackName"] == name and (
                    newest is None or summary["CreationTime"] > newest["CreationTime"]
                ):
                    newest = summary
        return newest["StackId"] if newest else None

    def _wait(self, stack_id: str, done: Callable[[str], bool], timeout: float, poll: float) -> str:
        """Poll the stack (by id) until ``done(status)``; return that status ("DELETE_COMPLETE" once it is gone)."""
        deadline = time.monotonic() + timeout
        while True:
            stack = self.describe(stack_id)
            status = stack["StackStatus"] if stack else "DELETE_COMPLETE"
            if done(status):
                return status
            if time.monotonic() >= deadline:
                raise StackFailed(f"stack {stack_id} still {status} after {timeout:.0f}s")
            time.sleep(poll)

    def delete_and_wait(self, name: str, timeout: float = 1800, poll: float = 10) -> str:
        """Delete the stack and wait; return the final status ("DELETE_COMPLETE" when gone).

        A stack still rolling back is waited for first. A DELETE_FAILED stack is
        returned as such, for the caller to clean up what blocked it and call again.
        A delete the service rejects outright (seen as DependencyViolation on some
        emulators) is treated the same way.
        """
        stack = self.describe(name)
        if stack is None:
            return "DELETE_COMPLETE"
        stack_id = stack["StackId"]
        if stack["StackStatus"] == "ROLLBACK_IN_PROGRESS":
            self.log.info("Stack %s is ROLLBACK_IN_PROGRESS: waiting for the rollback before deleting it", name)
            self._wait(stack_id, lambda status: status != "ROLLBACK_IN_PROGRESS", timeout, poll)
        try:
            self.conn.delete_stack(StackName=stack_id)
        except ClientError as err:
            self.log.warning("DeleteStack %s was refused: %s", name, err)
            return "DELETE_FAILED"
        return self._wait(stack_id, lambda status: status in ("DELETE_COMPLETE", "DELETE_FAILED"), timeout, poll)
