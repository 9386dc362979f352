"""Paths, ports and environment of the local profile's stack.

Everything the stack writes lives under one state directory (``.dtp/`` in the
project root unless ``DTP_HOME`` says otherwise), so ``down`` can stop exactly
what ``up`` started and a test can run a second stack beside the first.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from dtp.connections import TRAINING_QUEUE

PROJECT_ROOT = Path(__file__).resolve().parents[3]
REGION = "us-east-1"
# The account id the emulator (moto) gives every resource.
EMULATOR_ACCOUNT = "123456789012"


@dataclass(frozen=True)
class Ports:
    """Loopback ports of every service; ``DTP_PORT_OFFSET`` shifts them all."""

    postgres: int = 15432
    moto: int = 15050
    airflow_api: int = 18080
    worker_logs: int = 18793
    trigger_logs: int = 18794
    slurmctld: int = 16817
    slurmd_first: int = 17001
    redis: int = 16379
    registry: int = 15000
    sshd: int = 16022

    @classmethod
    def with_offset(cls, offset: int) -> Ports:
        base = cls()
        return cls(**{name: value + offset for name, value in base.__dict__.items()})

    def slurmd(self, nodes: int) -> list[int]:
        return [self.slurmd_first + i for i in range(nodes)]


EXECUTORS = ("local", "celery")
# Celery queues: control-plane tasks, and the tasks that submit and wait on Slurm jobs.
CELERY_QUEUES = {"control": "default", "training": TRAINING_QUEUE}
# Above the longest task (a deferred training wait holds no worker, but a sync run may): re-delivery after it.
CELERY_VISIBILITY_TIMEOUT_S = 48 * 3600


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state, and how its services are reached."""

    home: Path
    ports: Ports
    slurm_nodes: int = 2
    user: str = getpass.getuser()
    executor: str = "local"
    # False: the scheduler creates no scheduled runs (Airflow's use_job_schedule); manual runs and backfills still
    # run. The test session turns them off (DTP_SCHEDULES=off) so an unpaused DAG does not start a run of its own.
    schedules: bool = True

    @classmethod
    def from_env(cls, executor: str | None = None) -> StackConfig:
        """The stack of ``DTP_HOME``; executor: the argument, else ``DTP_EXECUTOR``, else the one it runs with."""
        home = Path(os.environ.get("DTP_HOME", PROJECT_ROOT / ".dtp")).resolve()
        offset = int(os.environ.get("DTP_PORT_OFFSET", "0"))
        chosen = executor or os.environ.get("DTP_EXECUTOR") or _read(home / "executor") or "local"
        if chosen not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {chosen!r}")
        schedules = os.environ.get("DTP_SCHEDULES", "on") != "off"
        return cls(home=home, ports=Ports.with_offset(offset), executor=chosen, schedules=schedules)

    def as_started(self) -> StackConfig:
        """This stack with the executor ``up`` recorded, whichever one this config asks for (``DTP_EXECUTOR``
        included); unchanged where none is recorded."""
        return replace(self, executor=_read(self.home / "executor") or self.executor)

    # --- directories -------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def slurm_dir(self) -> Path:
        return self.home / "slurm"

    @property
    def slurm_conf(self) -> Path:
        return self.slurm_dir / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.home / "munge" / "munge.socket"

    @property
    def postgres_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def shared_dir(self) -> Path:
        """The directory every Slurm node sees: the local stand-in for FSx for Lustre."""
        return self.home / "fsx"

    @property
    def ssh_dir(self) -> Path:
        return self.home / "ssh"

    def ssh_key(self, name: str) -> Path:
        """An ed25519 key pair made once per state directory: the private key's path (the public key beside it,
        ``.pub``)."""
        path = self.ssh_dir / name
        if not path.exists():
            self.ssh_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"dtp-{name}", "-f", str(path)]
            subprocess.run(argv, check=True, capture_output=True)
        return path

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "passwords.json"

    @property
    def env_file(self) -> Path:
        return self.home / "env"

    # --- endpoints ---------------------------------------------------------
    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.ports.registry}"

    @property
    def moto_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.moto}"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.airflow_api}"

    @property
    def database_url(self) -> str:
        """Airflow's database, as the ``airflow`` role with its password."""
        return f"postgresql+psycopg2://airflow:{self.database_password}@127.0.0.1:{self.ports.postgres}/airflow"

    @property
    def database_password(self) -> str:
        """The password of PostgreSQL's ``airflow`` role, the only one: every connection needs it."""
        return self.secret("postgres_password")

    @property
    def broker_url(self) -> str:
        """The Celery broker: the stack's Redis, with its password."""
        return f"redis://:{self.broker_password}@127.0.0.1:{self.ports.redis}/0"

    @property
    def broker_password(self) -> str:
        """The password Redis asks of every client (its ``requirepass``)."""
        return self.secret("redis_password")

    def secret(self, name: str) -> str:
        """A random secret generated once per state directory (mode 600); URL-safe, so it goes in a URL as it is."""
        path = self.home / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(secrets.token_urlsafe(32))
            path.chmod(0o600)
        return path.read_text().strip()

    def passwords(self) -> dict[str, str]:
        """The admin and viewer logins; the file is created with mode 600."""
        if not self.passwords_file.exists():
            self.passwords_file.parent.mkdir(parents=True, exist_ok=True)
            data = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
            self.passwords_file.write_text(json.dumps(data))
            self.passwords_file.chmod(0o600)
        return json.loads(self.passwords_file.read_text())

    def connections(self) -> dict[str, str]:
        """Airflow connections as ``AIRFLOW_CONN_*`` values: the profile lives here, not in code."""
        aws = {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": self.moto_url, "region_name": REGION},
        }
        slurm = {
            "conn_type": "generic",
            "extra": {"transport": "local", "slurm_conf": str(self.slurm_conf)},
        }
        # HyperPod's control plane is the emulator's; the stack's Slurm cluster stands in for its controller's.
        hyperpod = {
            "conn_type": "generic",
            "extra": {
                "execution_role_arn": f"arn:aws:iam::{EMULATOR_ACCOUNT}:role/dtp-hyperpod-execution",
                "lifecycle_bucket": "sagemaker-dtp-local-lifecycle",
                "slurm_conn_id": "slurm_default",
                "max_nodes": self.slurm_nodes,
                "python": sys.executable,
            },
        }
        # The stack's sshd stands in for a head node reached over ssh (ParallelCluster's, HyperPod's controller, a
        # cluster of your own): slurm_ssh is the Slurm cluster of slurm_default, through it.
        head_node = {
            "conn_type": "ssh",
            "host": "127.0.0.1",
            "port": self.ports.sshd,
            "login": self.user,
            "extra": {
                "key_file": str(self.ssh_key("client")),
                "host_key": self.ssh_key("host").with_name("host.pub").read_text().strip(),
            },
        }
        slurm_ssh = {
            "conn_type": "generic",
            "extra": {"transport": "ssh", "ssh_conn_id": "slurm_head", "shared_dir": str(self.shared_dir)},
        }
        # A plain-HTTP OCI registry on loopback stands in for ECR.
        registry = {"conn_type": "generic", "host": self.registry, "extra": {"tls_verify": False}}
        return {
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(aws),
            "AIRFLOW_CONN_SLURM_DEFAULT": json.dumps(slurm),
            "AIRFLOW_CONN_SLURM_HEAD": json.dumps(head_node),
            "AIRFLOW_CONN_SLURM_SSH": json.dumps(slurm_ssh),
            "AIRFLOW_CONN_CONTAINER_REGISTRY": json.dumps(registry),
            "AIRFLOW_CONN_DTP_HYPERPOD": json.dumps(hyperpod),
        }

    @property
    def fault_plan(self) -> Path:
        """Where the fault-injection suite writes its plan (see dtp.faults); absent, nothing is injected."""
        return self.home / "faults.json"

    def airflow_env(self) -> dict[str, str]:
        """The environment every Airflow component of the local stack runs with."""
        self.passwords()
        env = {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__FERNET_KEY": self._fernet_key(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.ports.airflow_api),
            "AIRFLOW__API__BASE_URL": self.airflow_url,
            "AIRFLOW__API__SECRET_KEY": self.secret("api_secret_key"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self.secret("jwt_secret"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.ports.worker_logs),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports.trigger_logs),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # The one scheduler shares the machine with CPU training. A heartbeat later than this
            # makes it fail its own job and reset its running tasks (LocalExecutor cannot adopt
            # them): a second try of a task whose first is still running, with no history of the first.
            "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "300",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.schedules),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "DTP_HOME": str(self.home),
            "DTP_SHARED_DIR": str(self.shared_dir),
            "DTP_PROJECT_ROOT": str(PROJECT_ROOT),
            "DTP_FAULT_PLAN": str(self.fault_plan),
            "SLURM_CONF": str(self.slurm_conf),
            "AWS_DEFAULT_REGION": REGION,
            "PYTHONPATH": str(PROJECT_ROOT / "plugins"),
        }
        if self.executor == "celery":
            env.update(
                {
                    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                    "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                    "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.database_url,
                    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": str(CELERY_VISIBILITY_TIMEOUT_S),
                    "AIRFLOW__OPERATORS__DEFAULT_QUEUE": CELERY_QUEUES["control"],
                }
            )
        env.update(self.connections())
        return env

    def _fernet_key(self) -> str:
        path = self.home / "secrets" / "fernet_key"
        if not path.exists():
            from cryptography.fernet import Fernet

            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.write_text(Fernet.generate_key().decode())
            path.chmod(0o600)
        return path.read_text().strip()

    def write_env_file(self) -> None:
        """Write ``.dtp/env``: ``source`` it to use the airflow CLI against this stack."""
        lines = [f"export {k}={shlex.quote(v)}" for k, v in sorted(self.airflow_env().items())]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)
