"""The local stack finds the PostgreSQL that scripts/setup installed, whichever major version the system ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtp.local.services import pg_bin


def test_the_newest_installed_postgresql_is_used(tmp_path: Path) -> None:
    for version, programs in (("9.6", ["initdb"]), ("15", ["initdb", "postgres"]), ("16", [])):
        (tmp_path / version / "bin").mkdir(parents=True)
        for program in programs:
            (tmp_path / version / "bin" / program).touch()
    # 16 is a leftover without its server programs; 15 outranks 9.6 as a number, not as a string.
    assert pg_bin(tmp_path) == tmp_path / "15" / "bin"


def test_no_postgresql_says_what_installs_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="scripts/setup installs it"):
        pg_bin(tmp_path)
