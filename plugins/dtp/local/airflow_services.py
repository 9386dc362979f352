"""The local stack's Airflow: its metadata database brought up to date (``migrate_airflow_db``), and its
components (the api-server, scheduler, dag-processor and triggerer, and with the Celery executor one worker per
queue) as ``Daemon``s (``dtp.local.daemon``), in start order."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dtp.local.config import CELERY_QUEUES, StackConfig
from dtp.local.daemon import Daemon, StackError, http_ok


def airflow_services(cfg: StackConfig) -> list[Daemon]:
    """Airflow's components, in start order: they need the stack's database (and Redis, with Celery) up."""
    services = [
        Daemon(
            name="airflow-api-server",
            command=_airflow("api-server"),
            ports=lambda c: [c.ports.airflow_api],
            health=_api_healthy,
            env=lambda c: c.airflow_env(),
            start_timeout=120.0,
        ),
        # Task logs are read from local disk by the api-server; Airflow's log server would bind every interface.
        _airflow_component("scheduler", "scheduler", "--skip-serve-logs", health=_component_healthy("scheduler")),
        _airflow_component("dag-processor", "dag-processor", health=_component_healthy("dag_processor")),
        _airflow_component("triggerer", "triggerer", "--skip-serve-logs", health=_component_healthy("triggerer")),
    ]
    if cfg.executor == "celery":
        services += _celery_workers()
    return services


def _venv_bin(name: str) -> str:
    """A console script installed beside this interpreter (the project's virtualenv)."""
    return str(Path(sys.executable).parent / name)


def _airflow(*args: str) -> Callable[[StackConfig], list[str]]:
    return lambda cfg: [_venv_bin("airflow"), *args]


def migrate_airflow_db(cfg: StackConfig) -> None:
    """Bring the stack's Airflow metadata database up to date (``airflow db migrate``); its output goes to
    ``airflow-db-migrate.log`` in the stack's log directory."""
    env = {**os.environ, **cfg.airflow_env()}
    airflow = _venv_bin("airflow")
    path = cfg.log_dir / "airflow-db-migrate.log"
    with path.open("ab") as log:
        migrated = subprocess.run([airflow, "db", "migrate"], env=env, stdout=log, stderr=subprocess.STDOUT)
    if migrated.returncode != 0:
        tail = "\n  ".join(path.read_text(errors="replace").splitlines()[-15:])
        raise StackError(f"airflow db migrate failed (exit {migrated.returncode}; log: {path}):\n  {tail}")


def _airflow_component(name: str, *args: str, health: Callable[[StackConfig], bool]) -> Daemon:
    return Daemon(
        name=f"airflow-{name}",
        command=_airflow(*args),
        ports=lambda cfg: [],
        health=health,
        env=lambda cfg: cfg.airflow_env(),
        start_timeout=90.0,
    )


def _api_healthy(cfg: StackConfig) -> bool:
    return http_ok(f"{cfg.airflow_url}/api/v2/monitor/health")


def _component_healthy(component: str) -> Callable[[StackConfig], bool]:
    """The api-server's health endpoint reports each component's last heartbeat."""

    def check(cfg: StackConfig) -> bool:
        try:
            with urllib.request.urlopen(f"{cfg.airflow_url}/api/v2/monitor/health", timeout=3) as resp:  # noqa: S310
                report = json.load(resp)
        except OSError:
            return False
        return report.get(component, {}).get("status") == "healthy"

    return check


def _celery_worker_answers(name: str) -> Callable[[StackConfig], bool]:
    """Whether worker ``name`` answers a ping through the stack's Redis; not when Redis itself is down."""

    def check(cfg: StackConfig) -> bool:
        from celery import Celery
        from kombu.exceptions import OperationalError

        app = Celery(broker=cfg.broker_url)
        try:
            return bool(app.control.ping(destination=[name], timeout=1.0))
        except (OSError, OperationalError):  # kombu raises the broker's connection errors as OperationalError
            return False
        finally:
            app.close()

    return check


def _celery_workers() -> list[Daemon]:
    """One worker per queue: control-plane tasks, and the Slurm job submit/wait tasks."""
    services = []
    for role, queue in CELERY_QUEUES.items():
        worker = f"{role}@dtp"
        concurrency = "2" if role == "control" else "1"
        services.append(
            Daemon(
                name=f"airflow-worker-{role}",
                command=_airflow("celery", "worker", "-H", worker, "-q", queue, "-c", concurrency, "--skip-serve-logs"),
                ports=lambda c: [],
                health=_celery_worker_answers(worker),
                env=lambda c: c.airflow_env(),
                start_timeout=120.0,
            )
        )
    return services
