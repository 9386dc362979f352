"""A heartbeat on the job's log while a long, silent operation runs.

A checkpoint's save or load prints nothing while it writes or reads (some 47 minutes for a 70B model at the FSx's
baseline): rank 0 says it is still at it every ``HEARTBEAT_S`` seconds, so the task's hang detection (a job silent
for hang_timeout_minutes, at least 1) does not take it for a hang.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

HEARTBEAT_S = 30.0


@contextlib.contextmanager
def heartbeat(what: str, every: float = HEARTBEAT_S) -> Iterator[None]:
    """Print ``what`` and the seconds since it began every ``every`` seconds until the block ends (on the job's
    log only, not in the metrics)."""
    done, began = threading.Event(), time.monotonic()

    def beat() -> None:
        while not done.wait(every):
            print(f"{what}: {time.monotonic() - began:.0f} s so far", flush=True)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
