"""SharedFilesystemHook on the worker's own filesystem (transport ``local``)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from dtp.hooks.shared_fs import SharedFilesystemHook


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SharedFilesystemHook:
    extra = {"transport": "local", "shared_dir": str(tmp_path)}
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps({"conn_type": "generic", "extra": extra}))
    return SharedFilesystemHook("slurm_default")


def test_the_text_goes_into_a_file_that_already_has_its_mode(
    hook: SharedFilesystemHook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mode is the file's before any text is in it: a script exporting a token is never readable by others,
    not even between the write and a chmod."""
    seen: list[int] = []
    fdopen = os.fdopen

    class Spying:
        def __init__(self, fd: int, *args: Any, **kwargs: Any) -> None:
            self.fd, self.file = fd, fdopen(fd, *args, **kwargs)

        def __enter__(self) -> Spying:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, text: str) -> int:
            seen.append(stat.S_IMODE(os.fstat(self.fd).st_mode))
            return self.file.write(text)

    monkeypatch.setattr(os, "fdopen", Spying)
    script = tmp_path / "train.sbatch"
    script.write_text("old")
    script.chmod(0o644)
    hook.write_file(str(script), "export HF_TOKEN='secret'\n", mode=0o700)
    assert seen == [0o700] and script.read_text() == "export HF_TOKEN='secret'\n"


def test_a_file_written_over_a_readable_one_takes_its_mode(hook: SharedFilesystemHook, tmp_path: Path) -> None:
    script = tmp_path / "run" / "train.sbatch"
    script.parent.mkdir()
    script.write_text("old")
    script.chmod(0o644)
    hook.write_file(str(script), "export HF_TOKEN='secret'\n", mode=0o700)
    assert script.read_text() == "export HF_TOKEN='secret'\n"
    assert stat.S_IMODE(script.stat().st_mode) == 0o700


def test_a_new_file_and_its_folders_are_made(hook: SharedFilesystemHook, tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "notes.txt"
    hook.write_file(str(path), "ü\n")
    assert path.read_text() == "ü\n" and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_command_gets_none_of_the_workers_secrets(
    hook: SharedFilesystemHook, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sbatch exports the environment it is run with into the job: the worker's secrets must not be in it."""
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", "fernet-key-of-the-worker")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws"}')
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/slurm.conf")
    seen = dict(line.split("=", 1) for line in hook.run(["env"]).splitlines() if "=" in line)
    assert not [name for name in seen if name.startswith("AIRFLOW")]
    assert seen["SLURM_CONF"] == "/etc/slurm/slurm.conf" and seen["PATH"] == os.environ["PATH"]
