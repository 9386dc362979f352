"""The base of the triggers that poll a resource until it settles or their deadline passes."""

from __future__ import annotations

import time
from typing import Any

from airflow.triggers.base import BaseTrigger


class DeadlineTrigger(BaseTrigger):
    """Polls every ``poll_interval`` seconds until its resource settles, or until ``timeout`` seconds after
    ``started_at`` (epoch seconds; default: when the task deferred).

    ``started_at`` is set when the task defers and serialized with the rest, so a restarted triggerer keeps the
    deadline instead of starting the clock again. Subclasses store their own arguments and return them from
    ``serialize_fields``.
    """

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
