"""The local stack's PostgreSQL and Redis let in only who has their passwords: generated once per state directory,
kept where only the stack's user reads them, carried by Airflow's URLs and never by a command line."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from dtp.local import services
from dtp.local.config import Ports, StackConfig

TRUSTING_PG_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@pytest.fixture
def cfg(tmp_path: Path) -> StackConfig:
    return StackConfig(home=tmp_path, ports=Ports(), executor="celery")


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], str | None]]:
    """What the PostgreSQL steps run, as the stack's own user, instead of running it."""
    ran: list[tuple[list[str], str | None]] = []

    def record(argv: list[str], what: str, *, stdin: str | None = None, env: dict[str, str] | None = None) -> None:
        ran.append((argv, stdin))

    monkeypatch.setattr(services, "run_checked", record)
    monkeypatch.setattr(services, "pg_bin", lambda: Path("/pg/bin"))
    monkeypatch.setattr(services.os, "geteuid", lambda: 1000)
    return ran


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) == 0o600


def test_airflow_reaches_its_database_and_broker_with_the_generated_passwords(cfg: StackConfig) -> None:
    env = cfg.airflow_env()
    database = make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    broker = make_url(env["AIRFLOW__CELERY__BROKER_URL"])
    postgres_password = cfg.home / "secrets" / "postgres_password"
    redis_password = cfg.home / "secrets" / "redis_password"
    assert (database.username, database.password) == ("airflow", postgres_password.read_text())
    assert (broker.host, broker.port, broker.password) == ("127.0.0.1", 16379, redis_password.read_text())
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert _private(postgres_password) and _private(redis_password)
    assert postgres_password.read_text() != redis_password.read_text()
    # The next `up` of the same state directory reads the same ones.
    assert StackConfig(home=cfg.home, ports=Ports()).database_url == cfg.database_url


def test_a_new_data_directory_is_made_with_the_password_and_no_trust(
    cfg: StackConfig, commands: list[tuple[list[str], str | None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    password_files: list[tuple[str, bool]] = []

    def initdb(argv: list[str], what: str, **_: object) -> None:
        password_file = Path(next(arg for arg in argv if arg.startswith("--pwfile=")).removeprefix("--pwfile="))
        password_files.append((password_file.read_text(), _private(password_file)))
        commands.append((argv, None))
        (cfg.postgres_dir / "data").mkdir()

    monkeypatch.setattr(services, "run_checked", initdb)
    services._prepare_postgres(cfg)

    [(argv, _)] = commands
    assert argv[:2] == ["/pg/bin/initdb", "-D"]
    assert {"--auth-local=scram-sha-256", "--auth-host=scram-sha-256"} <= set(argv)
    assert not [arg for arg in argv if "trust" in arg]
    assert password_files == [(cfg.database_password, True)]
    assert list(cfg.postgres_dir.iterdir()) == [cfg.postgres_dir / "data"]  # the copy initdb read is gone
    assert (cfg.postgres_dir / "data" / "pg_hba.conf").read_text() == services.PG_HBA


def test_a_data_directory_that_trusted_everyone_gets_the_password(
    cfg: StackConfig, commands: list[tuple[list[str], str | None]]
) -> None:
    data = cfg.postgres_dir / "data"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("15\n")
    (data / "pg_hba.conf").write_text(TRUSTING_PG_HBA)

    services._prepare_postgres(cfg)

    [(argv, stdin)] = commands
    assert argv[:4] == ["/pg/bin/postgres", "--single", "-D", str(data)]
    assert stdin == f"ALTER ROLE airflow PASSWORD '{cfg.database_password}'\n"
    assert cfg.database_password not in " ".join(argv)
    assert (data / "pg_hba.conf").read_text() == services.PG_HBA


def test_pg_hba_asks_every_connection_for_the_password() -> None:
    rules = [line.split() for line in services.PG_HBA.splitlines() if line and not line.startswith("#")]
    assert {(rule[0], rule[-2] if rule[0] == "host" else None) for rule in rules} == {
        ("local", None),
        ("host", "127.0.0.1/32"),
        ("host", "::1/128"),
    }
    assert {rule[-1] for rule in rules} == {"scram-sha-256"}


def test_only_the_servers_user_may_open_the_postgres_socket(cfg: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(services, "pg_bin", lambda: Path("/pg/bin"))
    command = services._postgres_command(cfg)
    assert "unix_socket_permissions=0700" in command
    assert f"unix_socket_directories={cfg.postgres_dir}" in command


def test_redis_asks_for_its_password_from_a_private_file(cfg: StackConfig) -> None:
    redis = services._redis()
    redis.prepare(cfg)
    conf = cfg.home / "secrets" / "redis.conf"
    assert conf.read_text() == f"requirepass {cfg.broker_password}\n"
    assert _private(conf)
    command = redis.command(cfg)
    assert command[:2] == ["redis-server", str(conf)]
    assert cfg.broker_password not in " ".join(command)  # any local user reads a command line


def test_a_private_file_written_over_loses_its_old_mode(tmp_path: Path) -> None:
    path = tmp_path / "conf"
    path.write_text("old")
    path.chmod(0o644)
    services._write_private(path, "new")
    assert path.read_text() == "new" and _private(path)
