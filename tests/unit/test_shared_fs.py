"""SharedFilesystemHook on the worker's own filesystem (transport ``local``)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from dtp.hooks.shared_fs import SharedFilesystemHook


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SharedFilesystemHook:
    extra = {"transport": "local", "shared_dir": str(tmp_path)}
    monkeypatch.setenv("AIRFLOW_CONN_SLURM_DEFAULT", json.dumps({"conn_type": "generic", "extra": extra}))
    return SharedFilesystemHook("slurm_default")


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
