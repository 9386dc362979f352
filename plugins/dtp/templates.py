"""Render include/templates with StrictUndefined, quoting for the target format.

Shell templates (``*.sh.j2``, ``*.sbatch.j2``) pass every ``{{ value }}``
through ``shlex.quote`` (Jinja's ``finalize``) and refuse line breaks, so a
param can never inject a command, even in a comment or ``#SBATCH`` line: a
template author cannot forget to quote.
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


class UnsafeTemplateValue(ValueError):
    """A value that quoting cannot make safe in a line-oriented file (a line break or NUL)."""


def _shell_finalize(value: Any) -> str:
    text = str(value)
    # Quoting keeps a newline inside the quotes, but in a comment or #SBATCH line it would start a new line.
    if any(c in text for c in "\n\r\0"):
        raise UnsafeTemplateValue(
            f"refusing to render {text[:60]!r} into a shell script: it contains a line break or NUL"
        )
    return shlex.quote(text)


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
