"""Run HashiCorp Packer builds of amazon-ebs templates with the credentials of an AWS connection.

``validate`` goes through packer-py. ``build`` starts packer itself with
``-machine-readable`` because packer-py waits for the process to end: the hook
needs each line as it comes (progress in the task log) and the process id (so a
killed task takes the build down with it). The AWS connection supplies
credentials and region; when it has an ``endpoint_url`` (the local EC2 API
emulator) the build runs the template's ``emulator`` source against it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.sdk import BaseHook
from packerpy import PackerExecutable

from dtp.processes import stop_group

AWS_SOURCE = "amazon-ebs.aws"
EMULATOR_SOURCE = "amazon-ebs.emulator"


class PackerError(RuntimeError):
    """packer exited non-zero; carries the error lines it printed."""


@dataclass(frozen=True)
class MachineReadableLine:
    """One line of ``packer -machine-readable`` output: ``timestamp,target,type,data...``."""

    target: str
    type: str
    data: tuple[str, ...]

    @classmethod
    def parse(cls, line: str) -> MachineReadableLine | None:
        parts = line.rstrip("\n").split(",")
        if len(parts) < 3 or not parts[0].isdigit():
            return None
        data = tuple(p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "\r") for p in parts[3:])
        return cls(target=parts[1], type=parts[2], data=data)

    @property
    def message(self) -> str | None:
        """The human text of a ``ui`` line (say/message/error), else None."""
        if self.type == "ui" and len(self.data) >= 2:
            return self.data[1].strip()
        return None

    @property
    def is_error(self) -> bool:
        return self.type == "ui" and bool(self.data) and self.data[0] == "error"


@dataclass
class BuildResult:
    """What a build printed that matters: artifact ids per source, and its error lines."""

    artifacts: dict[str, list[str]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, line: MachineReadableLine) -> None:
        if line.type == "artifact" and len(line.data) >= 3 and line.data[1] == "id":
            self.artifacts.setdefault(line.target, []).append(line.data[2])
        elif line.is_error and line.message:
            self.errors.append(line.message)

    def amis(self) -> dict[str, str]:
        """``{region: ami_id}`` from the amazon-ebs artifact ids (``region:ami-...,region2:ami-...``)."""
        found: dict[str, str] = {}
        for ids in self.artifacts.values():
            for artifact in ids:
                for pair in artifact.split(","):
                    region, _, ami = pair.partition(":")
                    if ami.startswith("ami-"):
                        found[region] = ami
        return found


def fingerprint(paths: Iterable[Path], variables: Mapping[str, str]) -> str:
    """A short digest of every input file and variable: equal inputs give an equal AMI name or image tag.

    Python's bytecode caches are left out: they come and go with whoever imported the sources (a test run, a worker)
    and would change the digest of the same inputs.
    """
    digest = hashlib.sha256()
    for path in sorted(paths):
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _bytecode(p)) if path.is_dir() else [path]
        for file in files:
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    for key in sorted(variables):
        digest.update(f"{key}={variables[key]}\0".encode())
    return digest.hexdigest()[:12]


def _bytecode(path: Path) -> bool:
    return path.suffix == ".pyc" or "__pycache__" in path.parts


class PackerHook(BaseHook):
    """
    Validate and build Packer templates with an AWS connection's credentials.

    The AMIs a build makes are found, tagged and deregistered with ``dtp.hooks.ami.AmiHook``.

    :param aws_conn_id: the AWS connection; its ``endpoint_url`` selects the emulator source
    :param packer_path: the packer executable
    """

    hook_name = "Packer"

    def __init__(self, aws_conn_id: str | None = "aws_default", packer_path: str = "packer") -> None:
        super().__init__()
        self.aws_conn_id = aws_conn_id
        self.packer_path = packer_path

    @cached_property
    def ec2(self) -> EC2Hook:
        """The connection's EC2 hook: packer's credentials, region and endpoint."""
        return EC2Hook(aws_conn_id=self.aws_conn_id, api_type="client_type")

    @property
    def endpoint_url(self) -> str | None:
        return self.ec2.conn_config.endpoint_url

    @property
    def source(self) -> str:
        """Which source of the template to build: the emulator's when the connection points at one."""
        return EMULATOR_SOURCE if self.endpoint_url else AWS_SOURCE

    def environment(self) -> dict[str, str]:
        """packer's environment: the connection's credentials and region."""
        credentials = self.ec2.get_credentials()
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": credentials.access_key,
            "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
            "AWS_REGION": self.ec2.conn_region_name or "us-east-1",
            "CHECKPOINT_DISABLE": "1",
        }
        if credentials.token:
            env["AWS_SESSION_TOKEN"] = credentials.token
        return env

    def _variables(self, variables: Mapping[str, str]) -> dict[str, str]:
        merged = {
            "region": self.ec2.conn_region_name or "us-east-1",
            # The ansible provisioner runs the ansible-playbook installed beside this interpreter.
            "ansible_playbook": str(Path(sys.executable).with_name("ansible-playbook")),
            **variables,
        }
        if self.endpoint_url:
            merged["ec2_endpoint"] = self.endpoint_url
        return merged

    def validate(self, template: Path, var_file: Path | None, variables: Mapping[str, str]) -> None:
        """``packer validate``; raises PackerError with packer's own message."""
        packer = PackerExecutable(executable_path=self.packer_path, machine_readable=False)
        args: dict[str, object] = {"var": self._variables(variables)}
        if var_file:
            args["var_file"] = str(var_file)
        rc, out, err = packer.validate(str(template), **args)
        if rc != 0:
            raise PackerError(
                f"packer validate {template.name} failed:\n{(out or b'').decode()}{(err or b'').decode()}"
            )

    def build_command(self, template: Path, var_file: Path | None, variables: Mapping[str, str]) -> list[str]:
        argv = [self.packer_path, "build", "-machine-readable", "-color=false", f"-only={self.source}"]
        if var_file:
            argv.append(f"-var-file={var_file}")
        argv += [f"-var={key}={value}" for key, value in sorted(self._variables(variables).items())]
        return [*argv, str(template)]

    def start_build(
        self, template: Path, var_file: Path | None, variables: Mapping[str, str], output: Path
    ) -> subprocess.Popen[bytes]:
        """Start ``packer build`` in its own process group (so it can be stopped as a whole), writing to ``output``.

        Not to a pipe: were the task that reads it killed, packer's next line (its own "cleaning up") would end it
        with SIGPIPE before it deleted its builder instance. A file outlives its reader, and packer its task.
        """
        with output.open("ab") as out:
            return subprocess.Popen(
                self.build_command(template, var_file, variables),
                cwd=template.parent,
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @staticmethod
    def follow(
        process: subprocess.Popen[bytes], output: Path, on_message: Callable[[str], None], poll_seconds: float = 0.5
    ) -> BuildResult:
        """Read the build's ``output`` as packer writes it, to its end, handing each UI message to ``on_message``."""
        result = BuildResult()
        for parsed in filter(None, map(MachineReadableLine.parse, _tail(process, output, poll_seconds))):
            result.add(parsed)
            if parsed.message:
                on_message(parsed.message)
        if process.wait() != 0:
            raise PackerError("packer build failed: " + ("; ".join(result.errors) or f"exit code {process.returncode}"))
        return result

    @staticmethod
    def stop(process: subprocess.Popen[Any], grace_seconds: float = 120.0) -> None:
        """Interrupt the build (packer then deletes its instance, key pair and security group), give it
        ``grace_seconds`` to clean up, then kill whatever is left of its process group (provisioners,
        plugins, anything they started)."""
        stop_group(process, signal.SIGINT, grace_seconds)


def _tail(process: subprocess.Popen[bytes], path: Path, poll_seconds: float) -> Iterator[str]:
    """The lines of ``path`` as ``process`` writes them, until it has exited and all it wrote was read."""
    pending = ""
    with path.open(encoding="utf-8", errors="replace") as file:
        while True:
            exited = process.poll() is not None  # before reading: what it wrote before exiting is read below
            chunk = file.read()
            *lines, pending = (pending + chunk).split("\n")
            yield from lines
            if exited:
                if pending:
                    yield pending
                return
            if not chunk:
                time.sleep(poll_seconds)
