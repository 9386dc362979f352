"""The local stack's daemons are tracked by pid file: a pid the system gave another process since (after a reboot
or a crash) is neither taken for the daemon nor stopped with it; a running stack is not added to with other
settings; and ``down`` stops everything ``up`` started, whatever executor it is asked for."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dtp.local import stack
from dtp.local.config import Ports, StackConfig
from dtp.local.daemon import Daemon, StackError, boot_id, pid_alive, start_time
from dtp.local.services import build_services


@pytest.fixture
def cfg(tmp_path: Path) -> Any:
    for name in ("run", "logs"):
        (tmp_path / name).mkdir()
    return SimpleNamespace(home=tmp_path, run_dir=tmp_path / "run", log_dir=tmp_path / "logs")


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """A process of someone else's, in a session of its own."""
    process = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


OTHER_BOOT = "00000000-0000-0000-0000-000000000000"


def sleeper() -> Daemon:
    return Daemon(name="sleeper", command=lambda cfg: ["sleep", "300"], ports=lambda cfg: [], health=lambda cfg: True)


def test_a_started_daemon_is_found_and_stopped(cfg) -> None:
    daemon = sleeper()
    daemon.start(cfg)
    pid = daemon.pid(cfg)
    assert pid is not None and daemon.pid_file(cfg).read_text() == f"{pid} {start_time(pid)} {boot_id()}"
    daemon.stop(cfg)
    assert not pid_alive(pid) and daemon.pid(cfg) is None


def test_a_pid_file_naming_a_process_started_since_is_stale(cfg, stranger) -> None:
    daemon = sleeper()
    # As after a reboot: the file names a pid that now belongs to another process, started at another time.
    daemon.pid_file(cfg).write_text(f"{stranger.pid} {int(start_time(stranger.pid)) - 1}")
    assert not daemon.running(cfg)
    daemon.stop(cfg)
    assert stranger.poll() is None, "the stranger's process was killed"
    daemon.start(cfg)  # not taken for "already up"
    assert daemon.pid(cfg) not in (None, stranger.pid)
    daemon.stop(cfg)


def forker() -> Daemon:
    """A daemon that forks a child into its process group (writing the child's pid to ``child``) and dies."""
    command = ["sh", "-c", "sleep 300 & echo $! > child; sleep 1"]
    return Daemon(name="forker", command=lambda cfg: command, ports=lambda cfg: [], health=lambda cfg: True)


def orphaned_child(daemon: Daemon, cfg: Any) -> int:
    """Start ``daemon`` and wait until it has died, leaving its child; the child's pid."""
    daemon.start(cfg)
    deadline = time.monotonic() + 30
    while daemon.running(cfg) or not (cfg.home / "child").exists():
        assert time.monotonic() < deadline, "the forker did not die"
        time.sleep(0.1)
    child = int((cfg.home / "child").read_text())
    assert pid_alive(child)
    return child


def test_what_a_dead_daemon_left_running_is_stopped_with_it(cfg) -> None:
    # A daemon that crashed leaves what it forked holding its ports: down, or the next up, stops it.
    daemon = forker()
    child = orphaned_child(daemon, cfg)
    daemon.stop(cfg)
    assert not pid_alive(child) and not daemon.pid_file(cfg).exists()


def test_a_process_recorded_in_another_boot_is_not_the_daemon(cfg) -> None:
    # After a reboot a pid, even with the same start tick (early-boot processes), may be another's.
    daemon = sleeper()
    daemon.start(cfg)
    pid, started, _ = daemon.recorded(cfg)
    daemon.pid_file(cfg).write_text(f"{pid} {started} {OTHER_BOOT}")
    try:
        assert not daemon.running(cfg)
        daemon.stop(cfg)
        assert pid_alive(pid), "another boot's process was killed"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_group_recorded_in_another_boot_is_left_alone(cfg) -> None:
    # After a reboot the group id may be another's: a pid file from another boot stops nothing.
    daemon = forker()
    child = orphaned_child(daemon, cfg)
    pid, started, _ = daemon.recorded(cfg)
    daemon.pid_file(cfg).write_text(f"{pid} {started} {OTHER_BOOT}")
    try:
        daemon.stop(cfg)
        assert pid_alive(child), "a process of another boot's group was killed"
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_stack_is_not_added_to_with_other_settings(tmp_path: Path, stranger) -> None:
    # scripts/demo's stack runs the schedules; a second `up` for the tests (schedules off) or with the other
    # executor would run beside it, mixing the two: it is refused before anything starts.
    demo = StackConfig(home=tmp_path, ports=Ports.with_offset(0), schedules=True)
    for directory in (demo.run_dir, demo.log_dir):
        directory.mkdir()
    (tmp_path / "settings").write_text(stack.settings(demo))
    postgres = next(s for s in build_services(demo) if s.name == "postgres")
    postgres.pid_file(demo).write_text(f"{stranger.pid} {start_time(stranger.pid)}")  # as if it ran postgres
    tests = StackConfig(home=tmp_path, ports=Ports.with_offset(0), schedules=False)
    assert stack.started_otherwise(demo) is None
    assert stack.started_otherwise(tests) == "the local executor, schedules on"
    with pytest.raises(StackError, match=r"runs with the local executor, schedules on; this asks for the local "):
        stack.up(tests)
    assert not demo.shared_dir.exists()
    postgres.pid_file(demo).unlink()  # nothing runs: any settings may start it
    assert stack.started_otherwise(tests) is None


@pytest.fixture
def stack_cfg(tmp_path: Path) -> StackConfig:
    cfg = StackConfig(home=tmp_path, ports=Ports.with_offset(0))
    for directory in (cfg.run_dir, cfg.log_dir):
        directory.mkdir()
    return cfg


def test_down_stops_what_a_service_that_died_left_running(stack_cfg: StackConfig) -> None:
    # A scheduler that crashed leaves its workers in its group (as an api-server its uvicorn workers, on its port).
    child = orphaned_child(replace(forker(), name="airflow-scheduler"), stack_cfg)
    stack.down(stack_cfg)
    assert not pid_alive(child)
    assert not list(stack_cfg.run_dir.iterdir())


def test_down_stops_the_executor_the_stack_was_started_with(
    stack_cfg: StackConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `DTP_EXECUTOR=local scripts/stack down` on a stack `up` started with Celery: its Redis stops too.
    (stack_cfg.home / "executor").write_text("celery")
    redis = replace(sleeper(), name="redis")
    redis.start(stack_cfg)
    pid = redis.pid(stack_cfg)
    monkeypatch.setenv("DTP_HOME", str(stack_cfg.home))
    monkeypatch.setenv("DTP_EXECUTOR", "local")
    assert stack.main(["down"]) == 0
    assert pid is not None and not pid_alive(pid)
