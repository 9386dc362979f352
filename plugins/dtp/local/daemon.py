"""How the local stack runs a daemon: in the foreground of its own session, tracked by a pid file.

Each daemon's pid is kept in ``<state>/run/<name>.pid`` with the time the process started and the boot it started
in, and its output in ``<state>/logs/<name>.log``; stopping signals the whole process group, so nothing a daemon
forked is left behind, even once the daemon itself has died. A pid file left by a reboot or a crash may name a pid
the system gave another process since: its start time and boot tell them apart, so that process is neither taken
for the daemon nor stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dtp.local.config import StackConfig


class StackError(RuntimeError):
    """A service could not be started, with the reason a person can act on."""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback URL we built
            return 200 <= resp.status < 300
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = ""
    if log and log.exists():
        tail = "\n  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-15:])
    raise StackError(f"{what} not healthy after {timeout:.0f}s (log: {log}){tail}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); read its state to tell it apart.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def boot_id() -> str:
    """This boot's random id: a pid, or a process group id, names the same process only within one boot."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat's 22nd field), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass
class Daemon:
    """A foreground process started in its own session and tracked by pid file."""

    name: str
    command: Callable[[StackConfig], Sequence[str]]
    ports: Callable[[StackConfig], Sequence[int]]
    health: Callable[[StackConfig], bool]
    env: Callable[[StackConfig], dict[str, str]] = field(default=lambda cfg: {})
    prepare: Callable[[StackConfig], None] = field(default=lambda cfg: None)
    start_timeout: float = 30.0

    def pid_file(self, cfg: StackConfig) -> Path:
        return cfg.run_dir / f"{self.name}.pid"

    def log_file(self, cfg: StackConfig) -> Path:
        return cfg.log_dir / f"{self.name}.log"

    def recorded(self, cfg: StackConfig) -> tuple[int, str, str] | None:
        """What the pid file says: the pid, its start time and the boot id (empty where an older file lacks them)."""
        path = self.pid_file(cfg)
        if not path.exists():
            return None
        pid, started, boot = [*path.read_text().split(), "", ""][:3]
        return int(pid), started, boot

    def pid(self, cfg: StackConfig) -> int | None:
        """The daemon's pid, if the process the pid file names is alive and is still the one that was started."""
        recorded = self.recorded(cfg)
        if recorded is None:
            return None
        pid, started, boot = recorded
        same = (not started or start_time(pid) == started) and (not boot or boot == boot_id())
        return pid if pid_alive(pid) and same else None

    def running(self, cfg: StackConfig) -> bool:
        return self.pid(cfg) is not None

    def healthy(self, cfg: StackConfig) -> bool:
        return self.running(cfg) and self.health(cfg)

    def start(self, cfg: StackConfig) -> None:
        if self.running(cfg):
            wait_until(lambda: self.health(cfg), self.start_timeout, self.name, self.log_file(cfg))
            return
        self.stop(cfg)  # what a dead daemon forked may still hold its ports
        taken = [p for p in self.ports(cfg) if port_open(p)]
        if taken:
            raise StackError(
                f"{self.name}: port {', '.join(map(str, taken))} on 127.0.0.1 is already in use by "
                "another process; stop it or set DTP_PORT_OFFSET to move the whole stack"
            )
        self.prepare(cfg)
        env = {**os.environ, **self.env(cfg)}
        with self.log_file(cfg).open("ab") as log:
            proc = subprocess.Popen(
                list(self.command(cfg)),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cfg.home,
                start_new_session=True,
            )
        self.pid_file(cfg).write_text(f"{proc.pid} {start_time(proc.pid) or '-'} {boot_id()}")
        wait_until(lambda: self.healthy(cfg), self.start_timeout, self.name, self.log_file(cfg))

    def stop(self, cfg: StackConfig) -> None:
        """Stop the daemon and its process group; where the daemon died, what it forked and left running in its
        group (in this boot: no new process takes the id of a group still in use)."""
        recorded = self.recorded(cfg)
        if recorded is not None:
            pid, _, boot = recorded
            if self.pid(cfg) is not None or (boot == boot_id() and not pid_alive(pid) and _group_alive(pid)):
                _kill_group(pid)
        self.pid_file(cfg).unlink(missing_ok=True)


def _kill_group(pid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _group_alive(pid):  # the leader too, while it lives: its group id is its pid
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
