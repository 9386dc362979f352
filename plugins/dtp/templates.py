"""Render include/templates with StrictUndefined, quoting for the target format.

Shell templates (``*.sh.j2``, ``*.sbatch.j2``) pass every ``{{ value }}``
through ``shlex.quote`` (Jinja's ``finalize``), so a param can never inject a
command: a template author cannot forget to quote.
"""

from __future__ import annotations

import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jinja2

from dtp.recipes import INCLUDE_DIR

TEMPLATE_DIR = INCLUDE_DIR / "templates"
SHELL_SUFFIXES = (".sh.j2", ".sbatch.j2")


def _shell_finalize(value: Any) -> str:
    return shlex.quote(str(value))


@cache
def _environment(shell: bool, template_dir: Path = TEMPLATE_DIR) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - shell quoting is applied by finalize, HTML templates use their own env
        finalize=_shell_finalize if shell else None,
    )


def render(name: str, **context: Any) -> str:
    return _environment(name.endswith(SHELL_SUFFIXES)).get_template(name).render(**context)
