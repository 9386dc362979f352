"""The base of the triggers that poll a resource until it settles or their deadline passes."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from airflow.providers.amazon.aws.utils.waiter_with_logging import RETRIABLE_ERROR_CODES
from airflow.triggers.base import BaseTrigger
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotocoreConnectionError

from dtp.platforms.pcluster_cli import PclusterError

# Failed calls in a row a poll tries again before it gives up, and the longest wait between two tries.
MAX_TRANSIENT_FAILURES = 10
MAX_RETRY_DELAY_S = 300.0

P = ParamSpec("P")
T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """Whether a call that raised ``error`` may well succeed when made again a little later: AWS throttled it or
    failed on its side (an error code the amazon provider's waiters keep waiting on, or a 5xx status), throttled
    a call of the pcluster CLI's, the connection failed or timed out (botocore's own retries spent), or a command did
    not answer in time."""
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return error.response.get("Error", {}).get("Code") in RETRIABLE_ERROR_CODES or status >= 500
    if isinstance(error, PclusterError):
        return error.throttled
    return isinstance(error, BotocoreConnectionError | HTTPClientError | subprocess.TimeoutExpired)


class DeadlineTrigger(BaseTrigger):
    """Polls every ``poll_interval`` seconds until its resource settles, or until ``timeout`` seconds after
    ``started_at`` (epoch seconds; default: when the task deferred).

    ``started_at`` is set when the task defers and serialized with the rest, so a restarted triggerer keeps the
    deadline instead of starting the clock again. Subclasses store their own arguments and return them from
    ``serialize_fields``, and make their calls through ``poll``, which waits out a transient error.
    """

    max_transient_failures = MAX_TRANSIENT_FAILURES

    def __init__(self, *, poll_interval: float, timeout: float, started_at: float | None) -> None:
        super().__init__()
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.started_at = time.time() if started_at is None else started_at

    def serialize_fields(self) -> dict[str, Any]:
        """The subclass's own constructor arguments, as ``serialize`` passes them back."""
        raise NotImplementedError

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self.serialize_fields(),
                "poll_interval": self.poll_interval,
                "timeout": self.timeout,
                "started_at": self.started_at,
            },
        )

    @property
    def past_deadline(self) -> bool:
        return time.time() > self.started_at + self.timeout

    async def poll(self, call: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``call(*args, **kwargs)`` in a thread, off the triggerer's event loop; its result.

        A transient error (``is_transient``) is logged and the call made again ``poll_interval`` seconds later,
        twice as long after each further failure in a row (``MAX_RETRY_DELAY_S`` at most): an outage that outlasts
        botocore's retries does not fail a wait of hours. The error of the last of ``max_transient_failures``
        retries in a row is raised, any other error at once.
        """
        failures = 0
        while True:
            try:
                return await asyncio.to_thread(call, *args, **kwargs)
            except Exception as err:
                failures += 1
                if not is_transient(err) or failures > self.max_transient_failures:
                    raise
                delay = min(self.poll_interval * 2 ** (failures - 1), MAX_RETRY_DELAY_S)
                self.log.warning(
                    "%s failed (%d/%d in a row), trying again in %.0f s: %r",
                    getattr(call, "__qualname__", call),
                    failures,
                    self.max_transient_failures,
                    delay,
                    err,
                )
                await asyncio.sleep(delay)
