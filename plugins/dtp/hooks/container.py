"""Build OCI images and push them to a registry: Docker when a daemon answers, buildah otherwise.

The registry comes from a connection: ``host`` is the registry (``host[:port]``),
``login``/``password`` its credentials, and the extra may say ``{"ecr": true,
"aws_conn_id": "aws_default"}`` (credentials from the amazon provider's
``EcrHook``, the repository created when missing) or ``{"tls_verify": false}``
(a plain-HTTP registry on loopback). Credentials travel in a mode-600 auth file,
never on a command line.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.providers.amazon.aws.hooks.ecr import EcrHook
from airflow.sdk import BaseHook

from dtp.naming import aws_tags
from dtp.processes import stop_group

MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
_DOCKER_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64})")


class ContainerBuildError(RuntimeError):
    """A build or push failed; carries the tool's last lines."""


class ContainerRegistryHook(BaseHook):
    """
    A container registry: credentials, manifest lookups, ECR repositories.

    :param registry_conn_id: connection whose host is the registry
    """

    conn_name_attr = "registry_conn_id"
    default_conn_name = "container_registry"
    conn_type = "generic"
    hook_name = "Container registry"

    def __init__(self, registry_conn_id: str = default_conn_name) -> None:
        super().__init__()
        self.registry_conn_id = registry_conn_id

    @cached_property
    def connection(self) -> Any:
        return self.get_connection(self.registry_conn_id)

    @property
    def extra(self) -> dict[str, Any]:
        return self.connection.extra_dejson

    @property
    def registry(self) -> str:
        host = self.connection.host
        return f"{host}:{self.connection.port}" if self.connection.port else host

    @property
    def tls_verify(self) -> bool:
        return bool(self.extra.get("tls_verify", True))

    @property
    def is_ecr(self) -> bool:
        return bool(self.extra.get("ecr"))

    @cached_property
    def ecr(self) -> EcrHook:
        return EcrHook(aws_conn_id=self.extra.get("aws_conn_id", "aws_default"))

    def credentials(self) -> tuple[str, str] | None:
        """(user, password) for the registry, or None for an anonymous one."""
        if self.is_ecr:
            token = self.ecr.get_temporary_credentials()[0]
            return token.username, token.password
        if self.connection.login:
            return self.connection.login, self.connection.password or ""
        return None

    @contextmanager
    def auth_file(self) -> Iterator[Path]:
        """A docker-config style auth file (mode 600) for buildah/docker, deleted afterwards."""
        with tempfile.TemporaryDirectory(prefix="dtp-registry-auth-") as folder:
            path = Path(folder) / "config.json"
            creds = self.credentials()
            auths = (
                {self.registry: {"auth": base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()}} if creds else {}
            )
            path.touch(mode=0o600)
            path.write_text(json.dumps({"auths": auths}))
            yield path

    def ensure_repository(self, repository: str, tags: Mapping[str, str]) -> None:
        """On ECR, create the repository (scan on push, tagged) unless it exists."""
        if not self.is_ecr:
            return
        client = self.ecr.conn
        try:
            client.describe_repositories(repositoryNames=[repository])
        except client.exceptions.RepositoryNotFoundException:
            client.create_repository(
                repositoryName=repository,
                imageScanningConfiguration={"scanOnPush": True},
                tags=aws_tags(tags),
            )

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The registry's digest of ``repository:reference`` (``Docker-Content-Digest``), None if absent. A registry
        that answers with a token challenge (Docker Hub, GHCR, Quay, Harbor) is asked for a pull token first."""
        scheme = "https" if self.tls_verify else "http"
        url = f"{scheme}://{self.registry}/v2/{repository}/manifests/{reference}"
        creds = self.credentials()
        basic = "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode() if creds else None
        try:
            return self._head_digest(url, basic)
        except urllib.error.HTTPError as err:
            challenge = err.headers.get("WWW-Authenticate", "") if err.code == 401 else ""
            if not challenge.lower().startswith("bearer "):
                _raise_unless_absent(err)
                return None
        try:
            return self._head_digest(url, "Bearer " + bearer_token(challenge, repository, basic))
        except urllib.error.HTTPError as err:
            _raise_unless_absent(err)
            return None

    @staticmethod
    def _head_digest(url: str, authorization: str | None) -> str | None:
        request = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_TYPES})  # noqa: S310
        if authorization:
            request.add_header("Authorization", authorization)
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http(s) only
            return response.headers.get("Docker-Content-Digest")

    def unpack(self, image: str, dest: Path) -> Path:
        """Unpack ``image`` (a ``registry/repo@digest`` reference) into ``dest`` as a root filesystem.

        What ``enroot import`` does for pyxis, for hosts without enroot: skopeo copies
        the image into a directory, its layers are extracted in order (tar's ``data``
        filter refuses absolute paths, links out of the tree and device files), and
        the tree is renamed into place, so a half-written one is never seen. An image
        already unpacked at ``dest`` is kept. Whiteout files are not applied: meant for
        images that add files layer on layer, as DTP's do, not for general images.
        """
        if dest.is_dir():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as work, self.auth_file() as auth:
            layout = Path(work) / "image"
            copied = subprocess.run(
                [
                    "skopeo",
                    "copy",
                    f"--authfile={auth}",
                    f"--src-tls-verify={str(self.tls_verify).lower()}",
                    f"docker://{image}",
                    f"dir:{layout}",
                ],
                check=False,
                capture_output=True,
                text=True,
            )
            if copied.returncode != 0:
                raise ContainerBuildError(f"cannot fetch {image}: {copied.stderr.strip()}")
            rootfs = Path(work) / "rootfs"
            rootfs.mkdir()
            manifest = json.loads((layout / "manifest.json").read_text())
            for layer in manifest["layers"]:
                with tarfile.open(layout / layer["digest"].split(":", 1)[1]) as archive:
                    archive.extractall(rootfs, filter="data")
            try:
                rootfs.rename(dest)
            except OSError:
                if not dest.is_dir():  # another run unpacked the same image meanwhile
                    raise
        return dest


class ImageBuilder:
    """Build and push with Docker (when its daemon answers) or buildah (daemonless, vfs storage)."""

    def __init__(self, tool: str | None = None) -> None:
        self.tool = tool or self.detect()
        self._process: subprocess.Popen[str] | None = None

    @staticmethod
    def detect() -> str:
        docker = shutil.which("docker")
        if docker and subprocess.run([docker, "info"], capture_output=True, check=False).returncode == 0:
            return "docker"
        if shutil.which("buildah"):
            return "buildah"
        raise ContainerBuildError("neither a Docker daemon nor buildah is available on this worker")

    def _base(self) -> list[str]:
        return ["docker"] if self.tool == "docker" else ["buildah", "--storage-driver", "vfs"]

    def build_command(
        self, context: Path, dockerfile: Path, ref: str, build_args: Mapping[str, str], labels: Mapping[str, str]
    ) -> list[str]:
        argv = [*self._base(), "build", "-f", str(dockerfile), "-t", ref]
        if self.tool == "buildah":
            argv += ["--isolation", "chroot", "--layers=false"]
        for key, value in sorted(build_args.items()):
            argv += ["--build-arg", f"{key}={value}"]
        for key, value in sorted(labels.items()):
            argv += ["--label", f"{key}={value}"]
        return [*argv, str(context)]

    def build(
        self,
        context: Path,
        dockerfile: Path,
        ref: str,
        build_args: Mapping[str, str],
        labels: Mapping[str, str],
        on_line: Callable[[str], None],
    ) -> None:
        self._stream(self.build_command(context, dockerfile, ref, build_args, labels), on_line, env=None)

    def push(self, ref: str, auth_file: Path, tls_verify: bool, on_line: Callable[[str], None]) -> str:
        """Push ``ref``; return the manifest digest the registry stored."""
        if self.tool == "docker":
            lines = self._stream(["docker", "push", ref], on_line, env={"DOCKER_CONFIG": str(auth_file.parent)})
            found = [m.group(1) for line in lines if (m := _DOCKER_DIGEST.search(line))]
            if not found:
                raise ContainerBuildError(f"docker push {ref} printed no digest")
            return found[-1]
        digest_file = auth_file.with_name("digest")
        self._stream(
            [
                *self._base(),
                "push",
                f"--authfile={auth_file}",
                f"--tls-verify={str(tls_verify).lower()}",
                f"--digestfile={digest_file}",
                ref,
            ],
            on_line,
            env=None,
        )
        return digest_file.read_text().strip()

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stop the build or push under way, and everything it started (a killed task's ``on_kill``)."""
        if self._process is not None:
            stop_group(self._process, signal.SIGTERM, grace_seconds)

    def _stream(self, argv: list[str], on_line: Callable[[str], None], env: dict[str, str] | None) -> list[str]:
        """Run ``argv`` in a process group of its own (so ``stop`` reaches all it starts), each line to ``on_line``."""
        lines: list[str] = []
        with subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        ) as process:
            self._process = process
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.rstrip()
                lines.append(line)
                on_line(line)
        self._process = None
        if process.returncode != 0:
            tail = "\n".join(lines[-20:])
            raise ContainerBuildError(f"{' '.join(argv[:3])} ... failed (exit code {process.returncode}):\n{tail}")
        return lines


def _raise_unless_absent(err: urllib.error.HTTPError) -> None:
    """Raise a registry's refusal, unless it only says it has no such manifest (404)."""
    if err.code != 404:
        raise err


def bearer_token(challenge: str, repository: str, basic: str | None) -> str:
    """A pull token for ``repository`` from the token service a ``WWW-Authenticate: Bearer realm=...`` challenge
    names (the registry token flow), asked with the connection's credentials when it has some."""
    fields = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    if not fields.get("realm", "").startswith(("https://", "http://")):
        raise ValueError(f"the registry's token challenge names no http(s) realm: {challenge!r}")
    query = {"service": fields.get("service", ""), "scope": fields.get("scope") or f"repository:{repository}:pull"}
    request = urllib.request.Request(f"{fields['realm']}?{urllib.parse.urlencode(query)}")  # noqa: S310
    if basic:
        request.add_header("Authorization", basic)
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the realm is http(s), checked above
        answer = json.load(response)
    return answer.get("token") or answer["access_token"]
