"""Build OCI images and push them: Docker when its daemon answers, buildah (daemonless, vfs storage) otherwise.

The registry's credentials come to ``push`` as an auth file
(``ContainerRegistryHook.auth_file``), never on a command line. Each build or
push runs in a process group of its own, so stopping it (a killed task's
``on_kill``) takes down everything it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from dtp.processes import stop_group

_DOCKER_DIGEST = re.compile(r"digest: (sha256:[0-9a-f]{64})")


class ContainerBuildError(RuntimeError):
    """A build, push or image fetch failed; carries the tool's last lines."""


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

    def remove(self, ref: str) -> None:
        """Remove the local copy of ``ref`` once it is pushed (its base images stay, for the next build): every
        build is gigabytes on the worker's disk (buildah's vfs storage copies each layer whole), and nothing reads
        it again: the runs pull the image from the registry."""
        argv = ["docker", "image", "rm", ref] if self.tool == "docker" else [*self._base(), "rmi", ref]
        self._stream(argv, lambda line: None, env=None)

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
