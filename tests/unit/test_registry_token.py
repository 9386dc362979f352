"""ContainerRegistryHook.manifest_digest against a registry that uses the token flow (Docker Hub, GHCR, Quay,
Harbor): a HEAD without a token gets a 401 challenge naming its token service, which is asked for a pull token
with the connection's credentials. An HTTP server on loopback plays the registry and its token service."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from dtp.hooks.registry import ContainerRegistryHook

DIGEST = "sha256:" + "ab" * 32
BASIC = "Basic " + base64.b64encode(b"robot:s3cret").decode()


class TokenRegistry(BaseHTTPRequestHandler):
    """``/v2/team/trainer/manifests/v1`` exists; a manifest needs ``Bearer pull-team/trainer``, which ``/token``
    gives for the right credentials and scope."""

    token_requests: list[dict[str, Any]] = []

    def do_HEAD(self) -> None:
        port = self.server.server_address[1]
        if self.headers.get("Authorization") != "Bearer pull-team/trainer":
            self.send_response(401)
            challenge = f'Bearer realm="http://127.0.0.1:{port}/token",service="registry.test"'
            self.send_header("WWW-Authenticate", challenge)
            self.end_headers()
            return
        found = self.path == "/v2/team/trainer/manifests/v1"
        self.send_response(200 if found else 404)
        if found:
            self.send_header("Docker-Content-Digest", DIGEST)
        self.end_headers()

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.token_requests.append({"query": query, "authorization": self.headers.get("Authorization")})
        allowed = url.path == "/token" and self.headers.get("Authorization") == BASIC
        body = json.dumps({"token": "pull-" + query["scope"].split(":")[1]} if allowed else {}).encode()
        self.send_response(200 if allowed else 401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

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
        "login": "robot",
        "password": "s3cret",
        "extra": {"tls_verify": False},
    }
    monkeypatch.setenv("AIRFLOW_CONN_CONTAINER_REGISTRY", json.dumps(conn))
    TokenRegistry.token_requests = []
    yield ContainerRegistryHook()
    server.shutdown()


def test_a_token_registry_gives_the_digest_after_a_pull_token(registry: ContainerRegistryHook) -> None:
    assert registry.manifest_digest("team/trainer", "v1") == DIGEST
    [asked] = TokenRegistry.token_requests
    assert asked == {
        "query": {"service": "registry.test", "scope": "repository:team/trainer:pull"},
        "authorization": BASIC,
    }


def test_a_manifest_a_token_registry_lacks_is_absent(registry: ContainerRegistryHook) -> None:
    assert registry.manifest_digest("team/trainer", "v2") is None


def test_credentials_the_token_service_refuses_fail_the_lookup(
    registry: ContainerRegistryHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "credentials", lambda: ("robot", "wrong"))
    with pytest.raises(Exception, match="401"):
        registry.manifest_digest("team/trainer", "v1")


def test_a_registry_has_the_images_whose_manifests_it_has(registry: ContainerRegistryHook) -> None:
    # The local profile's registry, as a backfill run checks the image its date reads.
    assert registry.has_image(f"{registry.registry}/team/trainer:v1")
    assert not registry.has_image(f"{registry.registry}/team/trainer:v2")
    assert not registry.has_image(f"{registry.registry}/team/trainer@sha256:{'cd' * 32}")
