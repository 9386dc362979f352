"""What a training image's tag follows, and the tag container_build's publish moves on a registry other than ECR.

The tag is a fingerprint of the Dockerfile, the build context and the build args
(ContainerImageBuildOperator): the context is include/training/, all the images
copy, so a template or recipe commit rebuilds no image. The build runs against a
copy of the project, whose files the tests change; the registry is asked for the
tag (and answers that it has it, so nothing is built). The published tag is moved
on a loopback HTTP server that plays a registry with the token flow.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from dtp.form_params import parse_params
from dtp.hooks.registry import ContainerRegistryHook
from dtp.images import container
from dtp.operators.container import ContainerImageBuildOperator
from dtp.recipes import INCLUDE_DIR

PROJECT = INCLUDE_DIR.parent
CONFS = {
    "local-cpu": {"image": "local-cpu", "platform": "local"},
    "training": {"image": "training", "platform": "eks"},
    "torchtitan": {"image": "torchtitan", "platform": "eks"},
    "neuron": {"image": "neuron", "platform": "eks"},
}
_COPY = re.compile(r"^(?:COPY|ADD)\s+(.+)$", re.IGNORECASE | re.MULTILINE)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the project's include/ and images/containers/, to change."""
    shutil.copytree(INCLUDE_DIR, tmp_path / "include", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(container.CONTAINERS_DIR, tmp_path / "images" / "containers")
    return tmp_path


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """The (repository, tag) each build asks the registry for, which answers that it has it."""
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps({"conn_type": "generic", "host": "registry.test"}))
    calls: list[tuple[str, str]] = []

    def has_it(hook: ContainerRegistryHook, repository: str, tag: str) -> str:
        calls.append((repository, tag))
        return "sha256:" + "e" * 64

    monkeypatch.setattr(ContainerRegistryHook, "manifest_digest", has_it)
    return calls


def tag_of(project: Path, image: str, build_args: dict[str, str] | None = None) -> str:
    """The tag container_build gives ``image`` built from ``project`` (its request's paths moved there)."""
    request = parse_params(container.ContainerBuildParams, {**CONFS[image], "build_args": build_args or {}})
    kwargs = request.build_request()
    for key in ("context_dir", "dockerfile"):
        kwargs[key] = str(project / Path(kwargs[key]).relative_to(PROJECT))
    built = ContainerImageBuildOperator(task_id="build", **kwargs).execute({})
    assert built["built"] is False
    tag: str = built["tag"].rpartition(":")[2]
    return tag


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


@pytest.mark.parametrize("image", sorted(CONFS))
def test_a_template_or_recipe_change_keeps_the_tag_a_training_program_change_moves_it(
    project: Path, asked: list[tuple[str, str]], image: str
) -> None:
    first = tag_of(project, image)
    assert tag_of(project, image) == first
    # Nothing the image copies: a template, a recipe, a schema.
    append(project / "include" / "templates" / "parallelcluster" / "cluster-config.yaml.j2", "# changed\n")
    append(next((project / "include" / "recipes").glob("*.yaml")), "# changed\n")
    assert tag_of(project, image) == first
    # Python's bytecode caches, which the context's .dockerignore keeps out of the image.
    (project / "include" / "training" / "__pycache__").mkdir()
    (project / "include" / "training" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\0")
    assert tag_of(project, image) == first

    append(project / "include" / "training" / "train.py", "# changed\n")
    changed = tag_of(project, image)
    assert changed != first
    append(project / "images" / "containers" / container.IMAGES[image].folder / "Dockerfile", "# changed\n")
    assert tag_of(project, image) not in (first, changed)
    assert {repository for repository, _ in asked} == {f"dtp/{image}"}


def test_a_build_arg_moves_the_tag(project: Path, asked: list[tuple[str, str]]) -> None:
    first = tag_of(project, "training")
    assert tag_of(project, "training", {"NCCL_VERSION": "2.28.3-1"}) != first


@pytest.mark.parametrize("image", sorted(container.IMAGES))
def test_each_image_copies_from_its_build_context_only_what_it_holds(image: str) -> None:
    # Docker refuses a source outside the context; one missing from it fails the build on the worker instead.
    request = parse_params(
        container.ContainerBuildParams, {"image": image, "platform": container.image_platforms(image)[0]}
    )
    context = Path(request.build_request()["context_dir"])
    assert context == INCLUDE_DIR / "training"
    copies = _COPY.findall(container.dockerfile(image).read_text())
    sources = [source for line in copies for source in line.split()[:-1] if not source.startswith("--")]
    assert sources and all((context / source).exists() for source in sources), sources


class TokenRegistry(BaseHTTPRequestHandler):
    """A registry's manifest API (HEAD, GET by tag or digest; PUT by tag) whose PUT needs a push token, which
    ``/token`` gives for the scope asked; the challenge names no scope, as some registries' do not."""

    manifests: dict[tuple[str, str], tuple[str, bytes]] = {}

    def _manifest(self) -> tuple[str, str]:
        repository, _, reference = self.path.removeprefix("/v2/").partition("/manifests/")
        return repository, reference

    def _answer(self, code: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(code)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        if url.path == "/token":
            scope = parse_qs(url.query)["scope"][0]
            self._answer(200, {"Content-Type": "application/json"}, json.dumps({"token": f"t {scope}"}).encode())
            return
        found = self.manifests.get(self._manifest())
        if found is None:
            self._answer(404, {})
            return
        media_type, body = found
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self._answer(200, {"Content-Type": media_type, "Docker-Content-Digest": digest}, body)

    def do_PUT(self) -> None:
        repository, tag = self._manifest()
        if self.headers.get("Authorization") != f"Bearer t repository:{repository}:pull,push":
            realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
            self._answer(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="registry.test"'})
            return
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.manifests[(repository, tag)] = (self.headers["Content-Type"], body)
        self._answer(201, {"Docker-Content-Digest": "sha256:" + hashlib.sha256(body).hexdigest()})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[ContainerRegistryHook]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), TokenRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = {
        "conn_type": "generic",
        "host": "127.0.0.1",
        "port": server.server_address[1],
        "extra": {"tls_verify": False},
    }
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps(conn))
    TokenRegistry.manifests = {}
    yield ContainerRegistryHook()
    server.shutdown()


def pushed(layer: int) -> str:
    """Put an OCI image manifest of one layer in the registry, as a build's push does; its digest."""
    body = json.dumps({"schemaVersion": 2, "layers": [{"digest": f"sha256:{layer:064d}"}]}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    for reference in (f"fp{layer}", digest):
        TokenRegistry.manifests[("dtp/local-cpu", reference)] = ("application/vnd.oci.image.manifest.v1+json", body)
    return digest


def test_a_registry_other_than_ecr_gets_the_published_tag_moved_to_the_same_manifest(
    registry: ContainerRegistryHook,
) -> None:
    first, second = pushed(1), pushed(2)
    registry.tag_image("dtp/local-cpu", first, "published-local")
    assert registry.manifest_digest("dtp/local-cpu", "published-local") == first
    registry.tag_image("dtp/local-cpu", second, "published-local")
    assert registry.manifest_digest("dtp/local-cpu", "published-local") == second
    assert (
        TokenRegistry.manifests[("dtp/local-cpu", "published-local")]
        == TokenRegistry.manifests[("dtp/local-cpu", second)]
    )
