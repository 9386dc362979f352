"""PackerHook.environment: packer gets a connection's static keys, and otherwise finds credentials where its AWS SDK
renews them (an AWS config file profile for a connection that assumes a role), never an assumed role's temporary
credentials, which a bake outlasts. No call reaches AWS: a role is only named in the profile packer would assume."""

from __future__ import annotations

import configparser
import json
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook
from botocore.credentials import ReadOnlyCredentials

from dtp.hooks import packer
from dtp.hooks.packer import PackerHook

ROLE = "arn:aws:iam::123456789012:role/dtp-bake"


@pytest.fixture(autouse=True)
def worker_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose own environment holds credentials of its own, a web identity's too."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "worker-token")
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/worker")


@pytest.fixture
def no_frozen_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: EC2Hook, *args: Any) -> None:
        raise AssertionError("the connection's credentials were frozen for packer")

    monkeypatch.setattr(EC2Hook, "get_credentials", refuse)


def hook(monkeypatch: pytest.MonkeyPatch, login: str | None = None, **extra: Any) -> PackerHook:
    conn = {"conn_type": "aws", "extra": {"region_name": "eu-west-1", **extra}}
    if login:
        conn |= {"login": login, "password": f"{login}-secret"}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", json.dumps(conn))
    return PackerHook(aws_conn_id="aws_test")


def profiles(env: dict[str, str]) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(env["AWS_CONFIG_FILE"])
    return parser


@pytest.mark.usefixtures("no_frozen_credentials")
def test_a_role_is_assumed_by_packer_with_the_connections_keys(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = hook(monkeypatch, "conn-key", role_arn=ROLE, assume_role_kwargs={"ExternalId": "x-1"}).environment(tmp_path)
    assert "AWS_SESSION_TOKEN" not in env and "AWS_ACCESS_KEY_ID" not in env and "AWS_ROLE_ARN" not in env
    assert (env["AWS_PROFILE"], env["AWS_REGION"]) == ("dtp", "eu-west-1")
    assert env["AWS_SHARED_CREDENTIALS_FILE"] == "/dev/null"
    config = profiles(env)
    assert dict(config["profile dtp"]) == {
        "role_arn": ROLE,
        "role_session_name": "Airflow_aws_test",
        "external_id": "x-1",
        "source_profile": "dtp-source",
    }
    assert dict(config["profile dtp-source"]) == {
        "aws_access_key_id": "conn-key",
        "aws_secret_access_key": "conn-key-secret",
    }
    assert stat.S_IMODE(Path(env["AWS_CONFIG_FILE"]).stat().st_mode) == 0o600


@pytest.mark.usefixtures("no_frozen_credentials")
def test_a_role_is_assumed_by_packer_with_the_workers_instance_role(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session = SimpleNamespace(get_credentials=lambda: SimpleNamespace(method="iam-role"))
    monkeypatch.setattr(packer.BaseSessionFactory, "basic_session", session)
    env = hook(monkeypatch, role_arn=ROLE).environment(tmp_path)
    assert profiles(env)["profile dtp"]["credential_source"] == "Ec2InstanceMetadata"
    assert "AWS_SESSION_TOKEN" not in env and "AWS_ACCESS_KEY_ID" not in env


@pytest.mark.usefixtures("no_frozen_credentials")
def test_a_role_is_assumed_by_packer_with_the_workers_web_identity(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    session = SimpleNamespace(get_credentials=lambda: SimpleNamespace(method="assume-role-with-web-identity"))
    monkeypatch.setattr(packer.BaseSessionFactory, "basic_session", session)
    config = profiles(hook(monkeypatch, role_arn=ROLE).environment(tmp_path))
    assert config["profile dtp"]["source_profile"] == "dtp-source"
    assert dict(config["profile dtp-source"]) == {
        "role_arn": "arn:aws:iam::123456789012:role/worker",
        "web_identity_token_file": "/var/run/secrets/token",
    }


@pytest.mark.usefixtures("no_frozen_credentials")
def test_a_web_identity_connection_is_assumed_by_packer_with_its_token_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    extra = {
        "role_arn": ROLE,
        "assume_role_method": "assume_role_with_web_identity",
        "assume_role_with_web_identity_federation": "file",
        "assume_role_with_web_identity_token_file": "/tokens/dtp",
    }
    env = hook(monkeypatch, **extra).environment(tmp_path)
    assert "AWS_SESSION_TOKEN" not in env and "AWS_WEB_IDENTITY_TOKEN_FILE" not in env
    assert dict(profiles(env)["profile dtp"]) == {
        "role_arn": ROLE,
        "role_session_name": "Airflow_aws_test",
        "web_identity_token_file": "/tokens/dtp",
    }


@pytest.mark.usefixtures("no_frozen_credentials")
def test_static_keys_go_to_packer_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    env = hook(monkeypatch, "conn-key").environment()
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("conn-key", "conn-key-secret")
    assert "AWS_SESSION_TOKEN" not in env and "AWS_WEB_IDENTITY_TOKEN_FILE" not in env  # the worker's


@pytest.mark.usefixtures("no_frozen_credentials")
def test_a_connection_without_keys_leaves_packer_to_its_own_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    env = hook(monkeypatch).environment()
    assert env["AWS_WEB_IDENTITY_TOKEN_FILE"] == "/var/run/secrets/token"  # packer's SDK renews what it finds
    assert env["AWS_SESSION_TOKEN"] == "worker-token" and "AWS_CONFIG_FILE" not in env
    env = hook(monkeypatch, profile_name="bake").environment()
    assert env["AWS_PROFILE"] == "bake" and "AWS_ACCESS_KEY_ID" not in env


def test_a_role_no_profile_can_assume_gets_the_credentials_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(EC2Hook, "get_credentials", lambda self, *args: ReadOnlyCredentials("a", "s", "t"))
    env = hook(monkeypatch, "conn-key", role_arn=ROLE, assume_role_kwargs={"Policy": "{}"}).environment()
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SESSION_TOKEN"]) == ("a", "t") and "AWS_CONFIG_FILE" not in env
