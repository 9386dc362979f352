"""Run HashiCorp Packer builds of amazon-ebs templates with the credentials of an AWS connection.

``validate`` goes through packer-py. ``build`` starts packer itself with
``-machine-readable`` because packer-py waits for the process to end: the hook
needs each line as it comes (progress in the task log) and the process id (so a
killed task takes the build down with it). The AWS connection supplies
credentials and region; when it has an ``endpoint_url`` (the local EC2 API
emulator) the build runs the template's ``emulator`` source against it.

A bake outlasts the credentials of an assumed role (15 to 60 minutes): packer
given them frozen would fail at CreateImage, unable even to terminate its
builder. So packer is given static keys only; other credentials it finds
where its AWS SDK renews them (``PackerHook.environment``).
"""

from __future__ import annotations

import configparser
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import BaseSessionFactory
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper
from airflow.sdk import BaseHook
from botocore.credentials import RefreshableCredentials
from packerpy import PackerExecutable

from dtp.processes import stop_group

AWS_SOURCE = "amazon-ebs.aws"
EMULATOR_SOURCE = "amazon-ebs.emulator"

# The variables packer's AWS SDK takes credentials (a web identity's too), or the profile that names them, from
# before any profile: left out of the environment of a build that is to use the connection's own.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)
# The AWS config file profile of a connection that assumes a role, and of the credentials it assumes it with.
ROLE_PROFILE = "dtp"
SOURCE_PROFILE = "dtp-source"
# The AWS config file's ``credential_source`` of the renewing credentials botocore names so (``Credentials.method``).
CREDENTIAL_SOURCES = {"iam-role": "Ec2InstanceMetadata", "container-role": "EcsContainer"}
# The connection's ``assume_role_kwargs`` an AWS config file profile has a key for.
ROLE_PROFILE_KEYS = {
    "RoleSessionName": "role_session_name",
    "ExternalId": "external_id",
    "DurationSeconds": "duration_seconds",
}


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
    def region(self) -> str:
        """The connection's region, else the one its client finds (in the environment, say), else us-east-1: the
        connection's is read without making a client (which assumes the connection's role)."""
        return self.ec2.region_name or self.ec2.conn_region_name or "us-east-1"

    @property
    def source(self) -> str:
        """Which source of the template to build: the emulator's when the connection points at one."""
        return EMULATOR_SOURCE if self.endpoint_url else AWS_SOURCE

    def environment(self, config_dir: Path | None = None) -> dict[str, str]:
        """packer's environment: the connection's region, and how packer gets the connection's credentials.

        A connection's static keys go into it. A connection that assumes a role gets an AWS config file profile,
        written into ``config_dir`` (a private directory that lasts as long as the build), with the role and what
        it is assumed with: the connection's or the worker's static keys (the file is readable by its owner only),
        a web identity token file, or the worker's instance or container role. One with neither leaves packer to
        its own chain (the worker's environment, instance profile or web identity token), in its ``profile_name``.
        Only a role no profile can assume (SAML, an assume_role_kwargs the file has no key for) gets credentials
        as they are now, which a long bake outlasts.
        """
        config = self.ec2.conn_config
        env = {**os.environ, "AWS_REGION": self.region, "CHECKPOINT_DISABLE": "1"}
        if config.role_arn:
            profiles = self._role_profiles(config, config.role_arn)
            if profiles is None:
                self.log.warning(
                    "packer gets credentials of role %s that expire: no AWS config profile assumes it %s",
                    config.role_arn,
                    f"with {config.assume_role_method} and {sorted(config.assume_role_kwargs)}",
                )
                return {**env, **self._frozen_credentials()}
            if config_dir is None:
                raise ValueError(f"{config.conn_repr} assumes a role: its AWS config profile needs a config_dir")
            path = config_dir / "aws-config"
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                profiles.write(file)
            return {
                **_without_credentials(env),
                "AWS_CONFIG_FILE": str(path),
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,  # no profile of the worker's shadows this one
                "AWS_PROFILE": ROLE_PROFILE,
            }
        if config.aws_access_key_id and config.aws_secret_access_key:
            static = {
                "AWS_ACCESS_KEY_ID": config.aws_access_key_id,
                "AWS_SECRET_ACCESS_KEY": config.aws_secret_access_key,
            }
            if config.aws_session_token:
                static["AWS_SESSION_TOKEN"] = config.aws_session_token
            return {**_without_credentials(env), **static}
        if config.profile_name:
            return {**_without_credentials(env), "AWS_PROFILE": config.profile_name}
        return env

    def _role_profiles(self, config: AwsConnectionWrapper, role_arn: str) -> configparser.ConfigParser | None:
        """The AWS config file profiles that assume the connection's role ``role_arn`` with its own credentials,
        or the worker's; None when no profile can."""
        if set(config.assume_role_kwargs) - set(ROLE_PROFILE_KEYS):
            return None
        session_name = re.sub(r"[^\w+=,.@-]+", "-", f"Airflow_{config.conn_id}")
        role = {"role_arn": role_arn, "role_session_name": session_name}
        role |= {ROLE_PROFILE_KEYS[key]: str(value) for key, value in config.assume_role_kwargs.items()}
        profiles = configparser.ConfigParser(interpolation=None)
        if config.assume_role_method == "assume_role_with_web_identity":
            token_file = config.extra_config.get("assume_role_with_web_identity_token_file") or os.environ.get(
                "AWS_WEB_IDENTITY_TOKEN_FILE"
            )
            if config.extra_config.get("assume_role_with_web_identity_federation") != "file" or not token_file:
                return None
            profiles[f"profile {ROLE_PROFILE}"] = {**role, "web_identity_token_file": token_file}
            return profiles
        if config.assume_role_method != "assume_role":
            return None
        source = BaseSessionFactory(conn=config).basic_session.get_credentials()
        if source is None:
            return None
        if source.method in CREDENTIAL_SOURCES:
            profiles[f"profile {ROLE_PROFILE}"] = {**role, "credential_source": CREDENTIAL_SOURCES[source.method]}
            return profiles
        if source.method == "assume-role-with-web-identity" and "AWS_ROLE_ARN" in os.environ:  # IRSA, say
            profiles[f"profile {SOURCE_PROFILE}"] = {
                "role_arn": os.environ["AWS_ROLE_ARN"],
                "web_identity_token_file": os.environ["AWS_WEB_IDENTITY_TOKEN_FILE"],
            }
        elif isinstance(source, RefreshableCredentials):  # SSO's, say: no source a profile names
            return None
        else:
            keys = source.get_frozen_credentials()
            profiles[f"profile {SOURCE_PROFILE}"] = {
                "aws_access_key_id": keys.access_key,
                "aws_secret_access_key": keys.secret_key,
            }
            if keys.token:
                profiles[f"profile {SOURCE_PROFILE}"]["aws_session_token"] = keys.token
        profiles[f"profile {ROLE_PROFILE}"] = {**role, "source_profile": SOURCE_PROFILE}
        return profiles

    def _frozen_credentials(self) -> dict[str, str]:
        """The connection's credentials as they are now."""
        credentials = self.ec2.get_credentials()
        env = {"AWS_ACCESS_KEY_ID": credentials.access_key, "AWS_SECRET_ACCESS_KEY": credentials.secret_key}
        if credentials.token:
            env["AWS_SESSION_TOKEN"] = credentials.token
        return env

    def _variables(self, variables: Mapping[str, str]) -> dict[str, str]:
        merged = {
            "region": self.region,
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
                env=self.environment(output.parent),
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


def _without_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less ``CREDENTIAL_VARIABLES``."""
    return {name: value for name, value in env.items() if name not in CREDENTIAL_VARIABLES}


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
