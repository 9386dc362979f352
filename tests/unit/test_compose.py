"""docker-compose.yaml: valid for Debian's docker-compose, in step with the local stack it mirrors, and built from a
context (.dockerignore) that holds what the Dockerfile copies and none of the local state or secrets."""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dtp.connections import TRAINING_QUEUE
from dtp.local.config import CELERY_QUEUES, PROJECT_ROOT, Ports, StackConfig

SECRETS = {"DTP_FERNET_KEY": "k", "DTP_API_SECRET_KEY": "s", "DTP_JWT_SECRET": "j"}
# Settings both must agree on; endpoints, credentials and paths differ by design.
SHARED = (
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__CORE__PARALLELISM",
    "AIRFLOW__CORE__LOAD_EXAMPLES",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT",
    "AIRFLOW__OPERATORS__DEFAULT_QUEUE",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD",
    "AWS_DEFAULT_REGION",
)


def compose(*args: str, secrets: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS} | (SECRETS if secrets else {})
    return subprocess.run(
        ["docker-compose", "-f", "docker-compose.yaml", *args],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved() -> dict:
    done = compose("config")
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def local_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return StackConfig(home=tmp_path_factory.mktemp("stack"), ports=Ports(), executor="celery").airflow_env()


def test_compose_file_validates() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stderr


def test_missing_secrets_are_refused_by_name() -> None:
    done = compose("config", "-q", secrets=False)
    assert done.returncode != 0 and "set DTP_FERNET_KEY in .env" in done.stderr


def test_settings_match_the_local_stack(resolved: dict, local_env: dict[str, str]) -> None:
    env = resolved["services"]["airflow-scheduler"]["environment"]
    assert {k: str(env[k]) for k in SHARED} == {k: local_env[k] for k in SHARED}


def test_aws_connection_matches_but_for_the_emulator_address(resolved: dict, local_env: dict[str, str]) -> None:
    env = resolved["services"]["airflow-scheduler"]["environment"]
    ours, theirs = json.loads(env["AIRFLOW_CONN_AWS_DEFAULT"]), json.loads(local_env["AIRFLOW_CONN_AWS_DEFAULT"])
    assert ours["extra"].pop("endpoint_url") == "http://moto:5000"
    theirs["extra"].pop("endpoint_url")
    assert ours == theirs


def test_one_worker_per_queue_of_the_local_stack(resolved: dict) -> None:
    # Debian's docker-compose 1.29 keeps the short syntax: command, volumes and ports stay strings.
    workers = {name: svc["command"].split() for name, svc in resolved["services"].items() if "worker" in name}
    queues = {cmd[cmd.index("-q") + 1] for cmd in workers.values()}
    assert queues == set(CELERY_QUEUES.values())


def test_the_training_worker_serves_the_queue_of_the_pipelines_training_tasks() -> None:
    # Moved from tests/e2e/test_celery.py: two modules' values, checked without a stack.
    assert CELERY_QUEUES["training"] == TRAINING_QUEUE


def test_the_training_worker_sees_the_clusters_shared_filesystem_where_the_connection_puts_it(resolved: dict) -> None:
    training = resolved["services"]["airflow-worker-training"]
    shared_dir = json.loads(training["environment"]["AIRFLOW_CONN_SLURM_DEFAULT"])["extra"]["shared_dir"]
    volumes = training["volumes"]
    assert any(v.startswith("/") and v.endswith(f":{shared_dir}:rw") for v in volumes), volumes
    assert not any(v.endswith(f":{shared_dir}:rw") for v in resolved["services"]["airflow-worker-control"]["volumes"])


def test_every_airflow_service_shares_settings_and_mounts(resolved: dict) -> None:
    airflow = {n: s for n, s in resolved["services"].items() if n.startswith("airflow-")}
    assert set(airflow) >= {
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
    }
    for name, service in airflow.items():
        targets = {volume.split(":")[1] for volume in service["volumes"]}
        assert {"/opt/airflow/dags", "/opt/airflow/plugins", "/opt/airflow/include"} <= targets, name
        if name != "airflow-init":
            assert "healthcheck" in service, name
    assert resolved["services"]["airflow-apiserver"]["ports"] == ["127.0.0.1:8080:8080/tcp"]  # loopback only


def test_image_requirements_are_the_projects(resolved: dict) -> None:
    def specs(path: Path) -> set[str]:
        lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
        return {line for line in lines if line}

    image = specs(PROJECT_ROOT / "images" / "containers" / "airflow" / "requirements.txt")
    assert image <= specs(PROJECT_ROOT / "requirements.txt")
    assert resolved["services"]["airflow-scheduler"]["build"]["dockerfile"] == "images/containers/airflow/Dockerfile"


def test_the_init_hands_the_secrets_it_writes_to_the_user_the_services_run_as(resolved: dict) -> None:
    # airflow-init runs as root; the api-server opens passwords.json to append ("a+") as the services' user.
    init = resolved["services"]["airflow-init"]
    script = init["command"][-1]
    user = resolved["services"]["airflow-apiserver"]["user"]
    assert init["user"] == "0:0" and user == "50000:0"
    chown = script.index(f"chown -R {user} /opt/airflow/secrets\n")
    assert script.index("/opt/airflow/secrets/passwords.json") < chown < script.index("airflow db migrate")


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in (PROJECT_ROOT / ".dockerignore").read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern leaves out what it matches and all under it; ``**/`` stands for any folders."""
    parts = path.split("/")
    paths = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(
        fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pattern[3:])
        if pattern.startswith("**/")
        else fnmatch.fnmatchcase(p, pattern)
        for pattern in patterns
        for p in paths
    )


def copy_sources(dockerfile: Path) -> list[str]:
    """The build-context paths the Dockerfile's COPY instructions take (their arguments but options and the last)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            sources += [arg for arg in line.split()[1:] if not arg.startswith("--")][:-1]
    return sources


def test_the_build_context_holds_what_the_image_copies_and_no_state_or_secrets(resolved: dict) -> None:
    build = resolved["services"]["airflow-scheduler"]["build"]
    patterns = dockerignore_patterns()
    sources = copy_sources(Path(build["context"]) / build["dockerfile"])
    assert sources and not [source for source in sources if dockerignored(source, patterns)]
    left_out = [
        ".venv/bin/python",
        ".venv-pcluster/bin/pcluster",
        ".dtp/secrets/jwt_secret",
        ".dtp/munge/munge.key",
        ".dtp/postgres/data/PG_VERSION",
        ".git/config",
        ".env",
        "build/mwaa/plugins.zip",
        "test-artifacts/fault_injection.json",
        "plugins/dtp/__pycache__/params.cpython-311.pyc",
        ".mypy_cache/3.11/dtp/params.data.json",
        "wheels/torch-2.9.0+cpu-cp311-cp311-linux_x86_64.whl",
    ]
    assert [path for path in left_out if not dockerignored(path, patterns)] == []
    assert not dockerignored(".env.example", patterns)
