"""``python -m dtp.local.stack up|down|status``: the local profile's services.

``up`` is idempotent: a healthy service is left alone, a dead one is started. It refuses to add to a stack that
runs with another executor or schedules setting (``down`` first), which would mix the two.
``down`` stops, by pid, exactly what ``up`` started, in reverse order: the services of the executor ``up`` recorded
(whatever ``DTP_EXECUTOR`` says now), and what a service that died left running.
"""

from __future__ import annotations

import argparse
import sys

from dtp.local.airflow_services import migrate_airflow_db
from dtp.local.config import EXECUTORS, StackConfig
from dtp.local.daemon import Daemon, StackError
from dtp.local.services import build_services, ensure_database


def up(cfg: StackConfig, *, airflow: bool = True) -> list[str]:
    """Start what is not running; return the names of the services this call started."""
    started = []
    if other := started_otherwise(cfg):
        raise StackError(
            f"the stack in {cfg.home} runs with {other}; this asks for {settings(cfg)}: run `scripts/stack down` first"
        )
    for directory in (cfg.home, cfg.run_dir, cfg.log_dir, cfg.shared_dir):
        directory.mkdir(parents=True, exist_ok=True)
    cfg.write_env_file()
    (cfg.home / "executor").write_text(cfg.executor)
    (cfg.home / "settings").write_text(settings(cfg))
    for service in _selected(cfg, airflow):
        if service.name == "airflow-api-server":
            migrate_airflow_db(cfg)
        was_running = service.running(cfg)
        service.start(cfg)
        print(f"  {service.name:<22} {'already up' if was_running else 'started'}", flush=True)
        if not was_running:
            started.append(service.name)
        if service.name == "postgres":
            ensure_database(cfg)
    return started


def down(cfg: StackConfig) -> None:
    """Stop every service of the executor the stack was started with that has a pid file: a running one, and what
    one that died left running in its process group."""
    for service in reversed(build_services(cfg.as_started())):
        if service.recorded(cfg) is not None:
            service.stop(cfg)
            print(f"  {service.name:<22} stopped", flush=True)
    (cfg.home / "executor").unlink(missing_ok=True)
    (cfg.home / "settings").unlink(missing_ok=True)


def settings(cfg: StackConfig) -> str:
    """What a stack started with ``cfg`` runs with, besides where."""
    return f"the {cfg.executor} executor, schedules {'on' if cfg.schedules else 'off'}"


def started_otherwise(cfg: StackConfig) -> str | None:
    """How the stack in ``cfg.home`` was started, when any of it runs and not as ``cfg`` would start it."""
    path = cfg.home / "settings"
    recorded = path.read_text().strip() if path.exists() else None
    if recorded is None or recorded == settings(cfg):
        return None
    return recorded if any(service.running(cfg) for service in build_services(cfg)) else None


def status(cfg: StackConfig) -> dict[str, str]:
    report = {}
    for service in build_services(cfg):
        pid = service.pid(cfg)
        if pid is None:
            report[service.name] = "stopped"
        else:
            report[service.name] = f"healthy (pid {pid})" if service.health(cfg) else f"UNHEALTHY (pid {pid})"
    return report


def _selected(cfg: StackConfig, airflow: bool) -> list[Daemon]:
    services = build_services(cfg)
    return services if airflow else [s for s in services if not s.name.startswith("airflow-")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack", description=__doc__)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument(
        "--no-airflow",
        action="store_true",
        help="no Airflow components: the emulator, PostgreSQL, Slurm, sshd and the registry",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        help="up: LocalExecutor (default) or CeleryExecutor with Redis and a worker per queue; kept until down",
    )
    args = parser.parse_args(argv)
    cfg = StackConfig.from_env(args.executor)
    try:
        if args.action == "up":
            print(f"Starting the local stack (state in {cfg.home})", flush=True)
            up(cfg, airflow=not args.no_airflow)
            print(f"Airflow UI: {cfg.airflow_url}  login: admin, password in {cfg.passwords_file}")
        elif args.action == "down":
            down(cfg)
        else:
            report = status(cfg)
            for name, state in report.items():
                print(f"  {name:<22} {state}")
            return 0 if all(s.startswith("healthy") for s in report.values()) else 1
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
