"""The local AWS emulator: moto's server behind a middleware that can make it return errors.

    python -m dtp.local.emulator --host 127.0.0.1 --port 15050

``/_dtp/faults`` sets the errors (the fault-injection suite uses it to play an
AWS control plane that throttles, is unavailable or refuses a call)::

    PUT /_dtp/faults {"rules": [{"service": "cloudformation", "action": "CreateStack",
                                  "code": "ServiceUnavailable", "status": 503, "times": 2}]}
    GET /_dtp/faults     the rules, each with how many calls it failed ("hits")
    DELETE /_dtp/faults  no more errors

A rule matches a call by service (the SigV4 credential scope's service) and,
when given, action (the operation, from ``X-Amz-Target`` or the ``Action``
parameter); it fails the next ``times`` matching calls (every one when null)
with ``code`` and ``status``, in the error format of the service's protocol,
so botocore parses, retries and raises exactly as it does against AWS.

A call moto does not implement gets a ``NotImplemented`` error (HTTP 501, not
retried) saying it is not supported on the local profile, instead of moto's
HTML "500 Internal Server Error" page that botocore would retry four times.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import os
import re
import signal
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

FAULTS_PATH = "/_dtp/faults"
_SCOPE = re.compile(r"Credential=[^/]+/[^/]+/[^/]+/([^/]+)/aws4_request")
StartResponse = Callable[..., Any]


class ErrorRule(BaseModel):
    """Fail the next ``times`` calls to ``service`` (and ``action``) with ``code`` / ``status``."""

    model_config = ConfigDict(extra="forbid")

    service: str
    action: str | None = None
    code: str
    status: int = Field(ge=400, le=599)
    message: str = "injected by the DTP emulator"
    times: int | None = Field(default=None, ge=1)
    hits: int = 0

    def take(self, service: str, action: str | None) -> bool:
        if service != self.service or (self.action is not None and action != self.action):
            return False
        if self.times is not None and self.hits >= self.times:
            return False
        self.hits += 1
        return True


class FaultingMiddleware:
    """WSGI middleware in front of moto's dispatcher: serves ``/_dtp/faults`` and fails matching calls."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]]) -> None:
        self.app = app
        self.rules: list[ErrorRule] = []
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == FAULTS_PATH:
            return self._faults_api(environ, start_response)
        if not self.rules:  # the usual case: no body parsing on the way to moto
            return self._moto(environ, start_response)
        service, action = self._identify(environ)
        if service is None:
            return self._moto(environ, start_response)
        with self.lock:
            rule = next((r for r in self.rules if r.take(service, action)), None)
        if rule is None:
            return self._moto(environ, start_response)
        body, content_type = _error_body(environ, service, rule.code, rule.message)
        start_response(f"{rule.status} Injected", [("Content-Type", content_type), ("x-amzn-RequestId", "dtp")])
        return [body]

    def _moto(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            return self.app(environ, start_response)
        except NotImplementedError as err:  # moto's backends propagate it (see _propagating)
            scope = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
            service = scope.group(1) if scope else "unknown"
            message = (
                f"not supported on the local profile: the local AWS emulator (moto {_moto_version()}) "
                f"does not implement it ({service}: {err})"
            )
            body, content_type = _error_body(environ, service, "NotImplemented", message)
            start_response("501 Not Implemented", [("Content-Type", content_type), ("x-amzn-RequestId", "dtp")])
            return [body]

    def _faults_api(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        with self.lock:
            if method == "PUT":
                payload = json.loads(_read_body(environ) or b"{}")
                self.rules = [ErrorRule.model_validate(r) for r in payload.get("rules", [])]
            elif method == "DELETE":
                self.rules = []
            body = json.dumps({"rules": [r.model_dump() for r in self.rules]}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]

    @staticmethod
    def _identify(environ: dict[str, Any]) -> tuple[str | None, str | None]:
        scope = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        if scope is None:
            return None, None
        target = environ.get("HTTP_X_AMZ_TARGET")
        if target:
            return scope.group(1), target.rsplit(".", 1)[-1]
        params = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
        if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            params |= urllib.parse.parse_qs(_read_body(environ).decode())
        return scope.group(1), (params.get("Action") or [None])[0]


def _read_body(environ: dict[str, Any]) -> bytes:
    """Read the request body and put it back, so the wrapped app reads it again."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    environ["wsgi.input"] = io.BytesIO(body)
    return body


def _error_body(environ: dict[str, Any], service: str, code: str, message: str) -> tuple[bytes, str]:
    """The error in the protocol botocore expects from this service."""
    if environ.get("HTTP_X_AMZ_TARGET"):
        return json.dumps({"__type": code, "message": message}).encode(), "application/x-amz-json-1.1"
    error = f"<Code>{code}</Code><Message>{html.escape(message)}</Message>"
    if service == "ec2":
        xml = f"<Response><Errors><Error>{error}</Error></Errors><RequestID>dtp</RequestID></Response>"
    elif service == "s3":
        xml = f"<Error>{error}<RequestId>dtp</RequestId></Error>"
    else:
        xml = f"<ErrorResponse><Error><Type>Sender</Type>{error}</Error><RequestId>dtp</RequestId></ErrorResponse>"
    return xml.encode(), "text/xml"


def _moto_version() -> str:
    from importlib.metadata import version

    return version("moto")


def _propagating(create_app: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """moto's per-service Flask apps, letting exceptions reach the middleware instead of an HTML 500 page."""

    def create(service: Any) -> Any:
        app = create_app(service)
        app.config["PROPAGATE_EXCEPTIONS"] = True
        return app

    return create


def main(argv: list[str] | None = None) -> None:
    """Serve moto as ``moto_server`` does, with the middleware in front."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import MotoRequestHandler, signal_handler
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    signal.signal(signal.SIGTERM, signal_handler)
    app = FaultingMiddleware(DomainDispatcherApplication(_propagating(create_backend_app)))
    run_simple(args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
