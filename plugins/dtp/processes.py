"""Stopping a tool a task started in a process group of its own (packer, docker, buildah) with all it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def stop_group(process: subprocess.Popen[Any], first: signal.Signals, grace_seconds: float) -> None:
    """Send ``first`` to ``process``'s group (the tool's own way to be stopped: it may clean up), give it
    ``grace_seconds`` to exit, then kill whatever is left of the group (children, plugins, anything they started)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, first)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_seconds)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
