"""The local stack: every service healthy and really answering, PostgreSQL and Redis only to who has their
password; down leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import urllib.error
import urllib.request
import uuid

import pytest

from dtp.local import services
from dtp.local import stack as stack_cli
from dtp.local.api import AirflowApi
from dtp.local.config import PROJECT_ROOT, StackConfig
from dtp.local.daemon import pid_alive, port_open

pytestmark = pytest.mark.stack


def test_all_services_healthy(stack: StackConfig) -> None:
    report = stack_cli.status(stack)
    assert report and all(state.startswith("healthy") for state in report.values()), report


def test_slurm_job_runs_on_both_nodes(stack: StackConfig) -> None:
    env = {**os.environ, "SLURM_CONF": str(stack.slurm_conf)}
    name = f"it-both-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=1", f"--job-name={name}", "bash", "-c", "echo $SLURMD_NODENAME"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert sorted(out.stdout.split()) == ["n1", "n2"]
    # The completion log has it (the hook reads ended jobs there once slurmctld forgets them).
    acct = subprocess.run(
        ["sacct", "-c", "-n", "-P", "-o", "JobName,State,NodeList"], capture_output=True, text=True, env=env, timeout=30
    )
    assert acct.returncode == 0
    assert [row for row in acct.stdout.split() if row.startswith(f"{name}|")] == [f"{name}|COMPLETED|n[1-2]"]


def test_emulator_answers_s3(aws) -> None:
    s3 = aws("s3")
    name = f"dtp-it-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    s3.put_object(Bucket=name, Key="k", Body=b"v")
    assert s3.get_object(Bucket=name, Key="k")["Body"].read() == b"v"
    s3.delete_object(Bucket=name, Key="k")
    s3.delete_bucket(Bucket=name)


def test_airflow_api_requires_login(stack: StackConfig, airflow_api) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{stack.airflow_url}/api/v2/dags", timeout=10)
    assert err.value.code == 401
    status, body = airflow_api.request("GET", "/api/v2/dags")
    assert status == 200 and "dags" in body


def test_a_wrong_password_gets_no_token(stack: StackConfig) -> None:
    with pytest.raises(PermissionError, match="login as 'admin' failed: HTTP 401"):
        AirflowApi(stack.airflow_url, "admin", "not-the-password")


def test_the_viewer_reads_but_cannot_trigger(stack: StackConfig, airflow_api) -> None:
    viewer = AirflowApi(stack.airflow_url, "viewer", stack.passwords()["viewer"])
    assert viewer.request("GET", "/api/v2/dags/train_e2e")[0] == 200
    before = airflow_api.request("GET", "/api/v2/dags/train_e2e/dagRuns?limit=1")[1]["total_entries"]
    status, _ = viewer.request("POST", "/api/v2/dags/train_e2e/dagRuns", {"logical_date": None, "conf": {}})
    assert status == 403
    assert airflow_api.request("GET", "/api/v2/dags/train_e2e/dagRuns?limit=1")[1]["total_entries"] == before


def test_passwords_file_is_private(stack: StackConfig) -> None:
    assert stat.S_IMODE(stack.passwords_file.stat().st_mode) == 0o600


def _psql(cfg: StackConfig, password: str | None) -> subprocess.CompletedProcess:
    """``SELECT current_user`` over TCP as ``airflow``, with ``password`` or none (never prompting, no ~/.pgpass)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {"PGPASSFILE": os.devnull}
    if password is not None:
        env["PGPASSWORD"] = password
    argv = ["psql", "-w", "-h", "127.0.0.1", "-p", str(cfg.ports.postgres), "-U", "airflow", "-d", "postgres"]
    return subprocess.run([*argv, "-tAc", "SELECT current_user"], env=env, capture_output=True, text=True, timeout=30)


def _assert_postgres_asks_for_the_password(cfg: StackConfig) -> None:
    without = _psql(cfg, None)
    assert without.returncode != 0 and "no password supplied" in without.stderr, without
    wrong = _psql(cfg, "not-the-password")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr, wrong
    right = _psql(cfg, cfg.database_password)
    assert (right.returncode, right.stdout.strip()) == (0, "airflow"), right
    # The socket is the server user's alone: another local account cannot even try a password there.
    socket_file = cfg.postgres_dir / f".s.PGSQL.{cfg.ports.postgres}"
    assert stat.S_IMODE(socket_file.stat().st_mode) == 0o700


def test_postgres_asks_every_connection_for_the_password(stack: StackConfig) -> None:
    _assert_postgres_asks_for_the_password(stack)


def test_a_data_directory_from_before_passwords_gets_one() -> None:
    """A state directory made when initdb trusted every local connection: the next start asks for the password."""
    home = PROJECT_ROOT / ".dtp" / f"it-pg-{uuid.uuid4().hex[:6]}"
    cfg = StackConfig(home=home.resolve(), ports=StackConfig.from_env().ports.with_offset(600))
    postgres = services.build_services(cfg)[0]
    try:
        for directory in (cfg.run_dir, cfg.log_dir, cfg.postgres_dir):
            directory.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(cfg.postgres_dir, "postgres", "postgres")
        data = cfg.postgres_dir / "data"
        initdb = [str(services.pg_bin() / "initdb"), "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8"]
        services.run_checked(services._as_postgres(initdb), "initdb as the stack ran it before passwords")
        postgres.start(cfg)
        services.ensure_database(cfg)
        _assert_postgres_asks_for_the_password(cfg)
        assert "trust" not in (data / "pg_hba.conf").read_text()
    finally:
        postgres.stop(cfg)
        shutil.rmtree(home, ignore_errors=True)


def test_redis_asks_every_client_for_the_password() -> None:
    import redis

    home = PROJECT_ROOT / ".dtp" / f"it-redis-{uuid.uuid4().hex[:6]}"
    cfg = StackConfig(home=home.resolve(), ports=StackConfig.from_env().ports.with_offset(600), executor="celery")
    broker = services._redis()
    try:
        for directory in (cfg.run_dir, cfg.log_dir):
            directory.mkdir(parents=True)
        broker.start(cfg)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=cfg.ports.redis, socket_timeout=5).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=cfg.ports.redis, password="not-the-password", socket_timeout=5).ping()
        assert redis.Redis.from_url(cfg.broker_url, socket_timeout=5).ping() is True
    finally:
        broker.stop(cfg)
        shutil.rmtree(home, ignore_errors=True)


def test_services_listen_on_loopback_only(stack: StackConfig) -> None:
    listening = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
    ports = set(stack.ports.__dict__.values()) | set(stack.ports.slurmd(stack.slurm_nodes))
    seen = set()
    for line in listening.splitlines():
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        if int(port) in ports:
            seen.add(int(port))
            assert host in ("127.0.0.1", "[::1]", "localhost"), line
    always_up = [
        stack.ports.postgres,
        stack.ports.moto,
        stack.ports.airflow_api,
        stack.ports.slurmctld,
        stack.ports.sshd,
    ]
    assert {*always_up, *stack.ports.slurmd(stack.slurm_nodes)} <= seen, listening


def test_second_stack_up_status_down_leaves_nothing() -> None:
    """A separate stack (own state dir, shifted ports, no Airflow) comes up healthy and goes away completely."""
    home = PROJECT_ROOT / ".dtp" / f"it-stack-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "DTP_HOME": str(home), "DTP_PORT_OFFSET": "300", "PYTHONPATH": str(PROJECT_ROOT / "plugins")}
    cli = [sys.executable, "-m", "dtp.local.stack"]
    try:
        up = subprocess.run([*cli, "up", "--no-airflow"], env=env, capture_output=True, text=True, timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        cfg = StackConfig(home=home.resolve(), ports=StackConfig.from_env().ports.with_offset(300))
        pids = [int(p.read_text().split()[0]) for p in cfg.run_dir.glob("*.pid")]  # "<pid> <start time>"
        assert len(pids) == 8 and all(
            pid_alive(p) for p in pids
        )  # postgres, moto, munged, slurmctld, 2 slurmd, sshd, registry
        assert all(port_open(p) for p in (cfg.ports.moto, cfg.ports.slurmctld, cfg.ports.sshd, cfg.ports.registry))
        status = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True)
        assert "postgres               healthy" in status.stdout
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not any(pid_alive(p) for p in pids)
        assert not any(
            port_open(p)
            for p in (cfg.ports.moto, cfg.ports.postgres, cfg.ports.slurmctld, cfg.ports.sshd, cfg.ports.registry)
        )
        assert not list(cfg.run_dir.glob("*.pid"))
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(home, ignore_errors=True)


def test_port_taken_is_reported_by_name(tmp_path) -> None:
    import socket

    home = PROJECT_ROOT / ".dtp" / f"it-port-{uuid.uuid4().hex[:6]}"
    cfg = StackConfig(home=home, ports=StackConfig.from_env().ports.with_offset(400))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", cfg.ports.postgres))
    blocker.listen()
    try:
        with pytest.raises(stack_cli.StackError, match=f"postgres: port {cfg.ports.postgres}.*already in use"):
            stack_cli.up(cfg, airflow=False)
    finally:
        blocker.close()
        stack_cli.down(cfg)
        shutil.rmtree(home, ignore_errors=True)
