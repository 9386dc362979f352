"""The pcluster CLI (aws-parallelcluster, in its own virtualenv) run with an AWS connection's credentials."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Any

from dtp.platforms.base import PlatformNotReady

# What pcluster answers for a cluster that does not exist, and for a dry run that passed.
NOT_FOUND = "does not exist"
DRYRUN_PASSED = "Request would have succeeded, but DryRun flag is set."
WHERE_PCLUSTER_IS = (
    "scripts/setup installs it (and Node.js, which it needs) on this machine, images/containers/airflow/Dockerfile "
    "in DTP's Airflow image; Amazon MWAA cannot install it, so runs there use another platform"
)


# What pcluster's answer says when AWS throttled one of its calls: AWS's message ("Rate exceeded"), which pcluster
# passes on, or the error code (CloudFormation's "Throttling", EC2's "RequestLimitExceeded"...). Not "limit exceeded"
# alone: a quota reached (too many stacks, say) stays reached.
THROTTLED = re.compile(r"throttl|rate exceeded|request ?limit ?exceeded|too ?many ?requests", re.IGNORECASE)


class PclusterError(RuntimeError):
    """The pcluster CLI refused a command; the message carries pcluster's own answer.

    :param action: the pcluster command (``describe-cluster``...)
    :param returncode: its exit status
    :param answer: its JSON answer (pcluster answers errors in JSON too)
    """

    def __init__(self, action: str, returncode: int, answer: dict[str, Any]) -> None:
        super().__init__(f"pcluster {action} exited {returncode}: {json.dumps(answer)}")
        self.action = action
        self.returncode = returncode
        self.answer = answer

    @property
    def throttled(self) -> bool:
        """Whether AWS throttled a call pcluster made: the same command may well succeed a little later."""
        return bool(THROTTLED.search(json.dumps(self.answer)))


class PclusterCli:
    """
    The pcluster CLI of ``.venv-pcluster`` with an AWS connection's region, credentials and endpoint.

    Every command is an argv list (no shell) and pcluster answers in JSON on stdout, errors included.

    :param executable: the pcluster executable
    :param aws_conn_id: the AWS connection; its ``endpoint_url`` (the local emulator) is passed on
    """

    def __init__(self, executable: str, aws_conn_id: str = "aws_default") -> None:
        self.executable = executable
        self.aws_conn_id = aws_conn_id

    @cached_property
    def aws(self) -> Any:
        from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

        return AwsBaseHook(aws_conn_id=self.aws_conn_id, client_type="cloudformation")

    @property
    def region(self) -> str:
        """The connection's region, else the environment's, else us-east-1 (read without making a client)."""
        return (
            self.aws.region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        )

    def environment(self) -> dict[str, str]:
        """pcluster's environment: the connection's credentials, region and endpoint; no instance metadata."""
        credentials = self.aws.get_credentials()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }
        if credentials.token:
            env["AWS_SESSION_TOKEN"] = credentials.token
        if endpoint := self.aws.conn_config.endpoint_url:
            env["AWS_ENDPOINT_URL"] = endpoint
            env["AWS_EC2_METADATA_DISABLED"] = "true"
        return env

    def command(self, action: str, *args: str) -> list[str]:
        return [self.executable, action, *args, "--region", self.region]

    def call(self, action: str, *args: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
        """Run ``pcluster action args``: its exit status and JSON answer (pcluster answers errors in JSON too)."""
        if not Path(self.executable).exists():
            raise PlatformNotReady(f"pcluster CLI {self.executable} is missing: {WHERE_PCLUSTER_IS}")
        argv = self.command(action, *args)
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.environment(), timeout=timeout)
        try:
            answer = json.loads(proc.stdout) if proc.stdout.strip() else {}
        except json.JSONDecodeError:
            answer = {"message": proc.stdout.strip()}
        if not answer and proc.returncode != 0:
            answer = {"message": proc.stderr.strip()[-2000:]}
        return proc.returncode, dict(answer)

    def run(self, action: str, *args: str, timeout: float = 600) -> dict[str, Any]:
        """Run ``pcluster action args``; its JSON answer, or ``PclusterError`` with pcluster's message."""
        returncode, answer = self.call(action, *args, timeout=timeout)
        if returncode != 0:
            raise PclusterError(action, returncode, answer)
        return answer

    def create_cluster(
        self, name: str, config: str, *, dryrun: bool = False, suppress_validators: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """``pcluster create-cluster`` of the configuration text ``config``; with ``dryrun``, validate it with every
        validator (AWS calls included) and create nothing."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"{name}-") as file:
            file.write(config)
            file.flush()
            args = ["--cluster-name", name, "--cluster-configuration", file.name, "--dryrun", str(dryrun).lower()]
            if suppress_validators:
                args += ["--suppress-validators", *(f"type:{v}" for v in suppress_validators)]
            returncode, answer = self.call("create-cluster", *args)
        # A dry run that passes still exits 1, with this message.
        if returncode != 0 and not (dryrun and answer.get("message") == DRYRUN_PASSED):
            raise PclusterError("create-cluster", returncode, answer)
        return answer

    def describe_cluster(self, name: str) -> dict[str, Any] | None:
        """``pcluster describe-cluster``; None when no such cluster exists."""
        try:
            return self.run("describe-cluster", "--cluster-name", name, timeout=120)
        except PclusterError as err:
            if NOT_FOUND in str(err):
                return None
            raise

    def delete_cluster(self, name: str) -> bool:
        """``pcluster delete-cluster``; False when there was no such cluster."""
        try:
            self.run("delete-cluster", "--cluster-name", name, timeout=120)
        except PclusterError as err:
            if NOT_FOUND in str(err):
                return False
            raise
        return True
