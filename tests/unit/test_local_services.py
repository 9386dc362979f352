"""The local stack finds the PostgreSQL that scripts/setup installed, whichever major version the system ships; its
health checks answer False, rather than fail, when what they ask is down."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dtp.local.airflow_services import _celery_worker_answers
from dtp.local.config import Ports, StackConfig
from dtp.local.daemon import StackError
from dtp.local.services import _prepare_postgres, pg_bin, run_checked


def test_the_newest_installed_postgresql_is_used(tmp_path: Path) -> None:
    for version, programs in (("9.6", ["initdb"]), ("15", ["initdb", "postgres"]), ("16", [])):
        (tmp_path / version / "bin").mkdir(parents=True)
        for program in programs:
            (tmp_path / version / "bin" / program).touch()
    # 16 is a leftover without its server programs; 15 outranks 9.6 as a number, not as a string.
    assert pg_bin(tmp_path) == tmp_path / "15" / "bin"


def test_no_postgresql_says_what_installs_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts/setup installs it"):
        pg_bin(tmp_path)


def test_a_failed_step_says_what_the_command_said() -> None:
    with pytest.raises(StackError, match=r"^initdb failed \(exit 3\): directory not empty$"):
        run_checked(["sh", "-c", "echo 'directory not empty' >&2; exit 3"], "initdb")


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as the postgres user only when the stack runs as root")
def test_a_state_directory_postgres_cannot_reach_is_refused_with_what_to_do(tmp_path: Path) -> None:
    closed = tmp_path / "root-like"  # as /root: mode 700, owned by root
    closed.mkdir(mode=0o700)
    cfg = StackConfig(home=closed, ports=Ports())
    with pytest.raises(StackError, match=r"which cannot reach .*: put the project where other users can read"):
        _prepare_postgres(cfg)


def test_a_celery_worker_is_unhealthy_while_redis_is_down(tmp_path: Path) -> None:
    # `scripts/stack status` reports the worker UNHEALTHY; kombu's OperationalError would end it with a traceback.
    with socket.socket() as bound:  # bound, not listening: a connection to it is refused
        bound.bind(("127.0.0.1", 0))
        cfg = StackConfig(home=tmp_path, ports=Ports(redis=bound.getsockname()[1]))
        assert _celery_worker_answers("control@dtp")(cfg) is False
