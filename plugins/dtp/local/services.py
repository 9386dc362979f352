"""The local stack's services (PostgreSQL, munge, Slurm, sshd, Redis, the registry, the emulator, and Airflow's own,
``dtp.local.airflow_services``): each one a ``Daemon`` (``dtp.local.daemon``) that knows how to prepare, start, check
and stop itself."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from dtp.local.airflow_services import airflow_services
from dtp.local.config import StackConfig
from dtp.local.daemon import Daemon, StackError, http_ok, port_open
from dtp.templates import render

PG_ROOT = Path("/usr/lib/postgresql")  # Debian and Ubuntu install each major version's programs under it
PLUGINS_DIR = Path(__file__).resolve().parents[2]


# --- PostgreSQL ---------------------------------------------------------------


@functools.cache
def pg_bin(root: Path = PG_ROOT) -> Path:
    """The programs of the newest PostgreSQL installed (Debian 12 has 15, Ubuntu 24.04 16)."""
    installed = [path.parent for path in root.glob("*/bin/initdb")]
    if not installed:
        raise FileNotFoundError(f"no PostgreSQL under {root}: scripts/setup installs it")
    return max(installed, key=lambda bin_dir: tuple(int(n) for n in bin_dir.parent.name.split(".") if n.isdigit()))


def run_checked(argv: list[str], what: str, *, stdin: str | None = None, env: dict[str, str] | None = None) -> None:
    """Run a step of bringing the stack up; a failure is a ``StackError`` in the command's own words."""
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        raise StackError(f"{what} failed (exit {done.returncode}): {said or 'no output'}")


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb refuses to run as root: run the PostgreSQL tools as ``postgres`` then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


# Every connection, over the socket or TCP, logs in with the password in <state>/secrets/postgres_password.
PG_HBA = """\
# Written by dtp.local.services each time PostgreSQL starts.
local   all   all                  scram-sha-256
host    all   all   127.0.0.1/32   scram-sha-256
host    all   all   ::1/128        scram-sha-256
"""


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable and writable by its owner only from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there before, with another mode
    with os.fdopen(fd, "w") as file:
        file.write(text)


def _prepare_postgres(cfg: StackConfig) -> None:
    data = cfg.postgres_dir / "data"
    if (data / "PG_VERSION").exists():
        # Also brings a data directory made when pg_hba.conf trusted every local connection up to the password.
        _set_password(cfg)
    else:
        _initdb(cfg)
    (data / "pg_hba.conf").write_text(PG_HBA)


def _initdb(cfg: StackConfig) -> None:
    cfg.postgres_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(cfg.postgres_dir, "postgres", "postgres")
        if subprocess.run(_as_postgres(["test", "-w", str(cfg.postgres_dir)])).returncode != 0:
            raise StackError(
                f"PostgreSQL runs as the postgres user, which cannot reach {cfg.postgres_dir} (a directory above "
                "it, such as /root, is closed to other users): put the project where other users can read, such as "
                "/opt or /srv, or point DTP_HOME at such a directory"
            )
    # A copy of the password that initdb, run as the postgres user, can read: the secrets directory is the stack
    # user's alone.
    password_file = cfg.postgres_dir / "initdb-password"
    _write_private(password_file, cfg.database_password)
    if os.geteuid() == 0:
        shutil.chown(password_file, "postgres", "postgres")
    try:
        initdb = [str(pg_bin() / "initdb"), "-D", str(cfg.postgres_dir / "data"), "-U", "airflow", "-E", "UTF8"]
        auth = ["--auth-local=scram-sha-256", "--auth-host=scram-sha-256", f"--pwfile={password_file}"]
        run_checked(_as_postgres([*initdb, *auth]), "initdb")
    finally:
        password_file.unlink(missing_ok=True)


def _set_password(cfg: StackConfig) -> None:
    """Give the ``airflow`` role the stack's password, in single-user mode (the server is not running yet): read
    from stdin, the password is in no command line, and an error stops the backend without logging the statement."""
    single_user = [str(pg_bin() / "postgres"), "--single", "-D", str(cfg.postgres_dir / "data")]
    quiet = ["-c", "exit_on_error=on", "-c", "log_min_error_statement=panic"]
    password = cfg.database_password.replace("'", "''")
    run_checked(
        _as_postgres([*single_user, *quiet, "postgres"]),
        "setting the airflow role's password",
        stdin=f"ALTER ROLE airflow PASSWORD '{password}'\n",
    )


def _postgres_command(cfg: StackConfig) -> list[str]:
    data = cfg.postgres_dir / "data"
    return _as_postgres(
        [
            str(pg_bin() / "postgres"),
            "-D",
            str(data),
            "-p",
            str(cfg.ports.postgres),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={cfg.postgres_dir}",
            "-c",
            "unix_socket_permissions=0700",
        ]
    )


def _postgres_ready(cfg: StackConfig) -> bool:
    probe = subprocess.run(
        [str(pg_bin() / "pg_isready"), "-h", "127.0.0.1", "-p", str(cfg.ports.postgres)],
        capture_output=True,
    )
    return probe.returncode == 0


def ensure_database(cfg: StackConfig) -> None:
    psql = ["psql", "-h", "127.0.0.1", "-p", str(cfg.ports.postgres), "-U", "airflow", "-d", "postgres", "-tAc"]
    env = {**os.environ, "PGPASSWORD": cfg.database_password}
    exists = subprocess.run(
        [*psql, "SELECT 1 FROM pg_database WHERE datname='airflow'"], env=env, capture_output=True, text=True
    )
    if exists.stdout.strip() != "1":
        run_checked([*psql, "CREATE DATABASE airflow"], "creating the airflow database", env=env)


# --- munge + Slurm ------------------------------------------------------------


def _prepare_munge(cfg: StackConfig) -> None:
    munge_dir = cfg.munge_socket.parent
    munge_dir.mkdir(parents=True, exist_ok=True)
    munge_dir.chmod(0o755)  # munged refuses a socket dir that others cannot traverse
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)


def _munge_command(cfg: StackConfig) -> list[str]:
    d = cfg.munge_socket.parent
    return [
        "/usr/sbin/munged",
        "--foreground",
        "--force",
        f"--socket={cfg.munge_socket}",
        f"--key-file={d / 'munge.key'}",
        f"--pid-file={d / 'munged.pid'}",
        f"--seed-file={d / 'munged.seed'}",
        f"--log-file={cfg.log_dir / 'munged-internal.log'}",
    ]


def render_slurm_conf(cfg: StackConfig) -> str:
    nodes = [{"name": f"n{i + 1}", "port": port} for i, port in enumerate(cfg.ports.slurmd(cfg.slurm_nodes))]
    return render(
        "slurm/slurm.conf.j2",
        nodes=nodes,
        ctld_port=cfg.ports.slurmctld,
        user=cfg.user,
        munge_socket=cfg.munge_socket,
        state_dir=cfg.slurm_dir,
        log_dir=cfg.log_dir,
        cpus=2,
    )


def _prepare_slurm(cfg: StackConfig) -> None:
    (cfg.slurm_dir / "ctld").mkdir(parents=True, exist_ok=True)
    cfg.slurm_conf.write_text(render_slurm_conf(cfg))
    cfg.shared_dir.mkdir(parents=True, exist_ok=True)


def slurm_env(cfg: StackConfig) -> dict[str, str]:
    return {"SLURM_CONF": str(cfg.slurm_conf)}


def _slurmd(index: int) -> Daemon:
    name = f"n{index + 1}"
    return Daemon(
        name=f"slurmd-{name}",
        command=lambda cfg: ["/usr/sbin/slurmd", "-D", "-N", name, "-f", str(cfg.slurm_conf)],
        ports=lambda cfg: [cfg.ports.slurmd(cfg.slurm_nodes)[index]],
        health=lambda cfg: port_open(cfg.ports.slurmd(cfg.slurm_nodes)[index]),
        env=slurm_env,
    )


# --- sshd ---------------------------------------------------------------------


def _prepare_sshd(cfg: StackConfig) -> None:
    authorized_keys = cfg.ssh_dir / "authorized_keys"
    authorized_keys.write_text(cfg.ssh_key("client").with_name("client.pub").read_text())
    authorized_keys.chmod(0o600)
    config = render(
        "ssh/sshd_config.j2",
        port=cfg.ports.sshd,
        host_key=cfg.ssh_key("host"),
        authorized_keys=authorized_keys,
        user=cfg.user,
        slurm_conf=cfg.slurm_conf,
    )
    (cfg.ssh_dir / "sshd_config").write_text(config)
    if os.geteuid() == 0:  # sshd run by root separates privileges, in a directory it expects to exist
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)


def _sshd() -> Daemon:
    """Debian's OpenSSH server on loopback, as the stack's user: the head node of the ``slurm_ssh`` connection."""
    return Daemon(
        name="sshd",
        command=lambda c: ["/usr/sbin/sshd", "-D", "-e", "-f", str(c.ssh_dir / "sshd_config")],
        ports=lambda c: [c.ports.sshd],
        health=lambda c: port_open(c.ports.sshd),
        prepare=_prepare_sshd,
    )


# --- Redis and the registry ---------------------------------------------------


def _redis_conf(cfg: StackConfig) -> Path:
    return cfg.home / "secrets" / "redis.conf"


def _prepare_redis(cfg: StackConfig) -> None:
    """The password goes in a file of the stack user's alone: on the command line every local user would see it."""
    password = cfg.broker_password  # made first, with the secrets directory
    _write_private(_redis_conf(cfg), f"requirepass {password}\n")


def _redis() -> Daemon:
    """The Celery broker (PostgreSQL is the result backend); every client logs in with ``secrets/redis_password``."""
    return Daemon(
        name="redis",
        command=lambda c: [
            "redis-server",
            str(_redis_conf(c)),
            *("--port", str(c.ports.redis), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--dir", str(c.home), "--save", "", "--appendonly", "no"),
        ],
        ports=lambda c: [c.ports.redis],
        health=lambda c: port_open(c.ports.redis),
        prepare=_prepare_redis,
    )


def _prepare_registry(cfg: StackConfig) -> None:
    (cfg.home / "registry").mkdir(parents=True, exist_ok=True)
    config = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(cfg.home / "registry")}, "delete": {"enabled": True}},
        "http": {"addr": cfg.registry},
    }
    (cfg.home / "registry.yml").write_text(json.dumps(config))


def _registry() -> Daemon:
    """Debian's docker-registry (distribution) on loopback: where container_build pushes locally."""
    return Daemon(
        name="registry",
        command=lambda c: ["docker-registry", "serve", str(c.home / "registry.yml")],
        ports=lambda c: [c.ports.registry],
        health=lambda c: http_ok(f"http://{c.registry}/v2/"),
        prepare=_prepare_registry,
    )


def build_services(cfg: StackConfig) -> list[Daemon]:
    """All services, in start order (stop runs in reverse)."""
    services = [
        Daemon(
            name="postgres",
            command=_postgres_command,
            ports=lambda c: [c.ports.postgres],
            health=_postgres_ready,
            prepare=_prepare_postgres,
        ),
        Daemon(
            name="moto",
            # moto's server behind dtp.local.emulator's error-injection middleware.
            command=lambda c: [
                sys.executable,
                "-m",
                "dtp.local.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(c.ports.moto),
            ],
            env=lambda c: {"PYTHONPATH": str(PLUGINS_DIR)},
            ports=lambda c: [c.ports.moto],
            health=lambda c: http_ok(f"{c.moto_url}/moto-api/"),
        ),
        Daemon(
            name="munged",
            command=_munge_command,
            ports=lambda c: [],
            health=lambda c: c.munge_socket.exists(),
            prepare=_prepare_munge,
        ),
        Daemon(
            name="slurmctld",
            command=lambda c: ["/usr/sbin/slurmctld", "-D", "-f", str(c.slurm_conf)],
            ports=lambda c: [c.ports.slurmctld],
            health=lambda c: port_open(c.ports.slurmctld),
            env=slurm_env,
            prepare=_prepare_slurm,
        ),
    ]
    services += [_slurmd(i) for i in range(cfg.slurm_nodes)]
    services += [_sshd(), _registry()]
    if cfg.executor == "celery":
        services.append(_redis())
    return services + airflow_services(cfg)
