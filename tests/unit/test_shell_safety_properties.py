"""Property-based: whatever a person types into the trigger form's text fields is refused, naming the field, or kept
exactly; and what is kept runs no command in the training job's batch script, whose exports give each extra_env
variable its value byte for byte."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import given, reject, settings
from hypothesis import strategies as st
from templates_support import fake_slurm

from dtp.form_params import ParamsError
from dtp.params import validate_cluster_params, validate_params
from dtp.pipeline import jobs
from dtp.pipeline.spec import run_spec

# Hypothesis keeps caches (and a failure's patch) in .hypothesis/ of the working directory, read when it first writes,
# after collection: in the temporary folder instead, so that a run leaves nothing in the checkout.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "dtp-hypothesis"))
# The same examples on every run and machine (derandomize), none kept between runs (no .hypothesis database), and no
# per-example deadline: an example of the batch script runs bash and the Slurm stand-ins.
CI = settings(derandomize=True, database=None, deadline=None, max_examples=200)

# A file a value's command would create in the job's working directory, were it run.
CANARY = "CANARY"
# Commands, and ways out of a quoted or unquoted word into a command.
INJECTIONS = [
    *(f"$(touch {CANARY})", f"`touch {CANARY}`", f";touch {CANARY}", f"&& touch {CANARY}", f"|touch {CANARY}"),
    *(f"'; touch {CANARY}; '", f'"; touch {CANARY}; "', f"'$(touch {CANARY})'", f"$(touch${{IFS}}{CANARY})"),
    *(f"\ntouch {CANARY}", f"\rtouch {CANARY}", f"\0touch {CANARY}"),
]
# What a shell gives a meaning to, other characters a parser may trip on, and pieces of values the fields accept (so
# that some examples get through).
PIECES = [
    *("$(", "`", "'", '"', "\\", ";", "&&", "|", "\n", "\r", "\0", "${IFS}", "*", "~", "#", "!", "$", "{", "}"),
    *(" ", "\t", "=", ",", "[", "]", "-", "..", "/", "%", "\x0b", "\x85", "\u2028", "é", "\U0001f680"),
    *("s3://bucket/", "lang=en/", "n[1-2]", "gpu-7", "local.cpu", "INFO"),
]
LINE_BREAKS = "\n\r\0"


def hostile(
    characters: st.SearchStrategy[str], injections: list[str] = INJECTIONS, pieces: list[str] = PIECES
) -> st.SearchStrategy[str]:
    """Text of ``injections``, ``pieces`` and a few ``characters`` between them."""
    part = st.one_of(st.sampled_from(injections), st.sampled_from(pieces), st.text(characters, max_size=3))
    return st.lists(part, max_size=8).map("".join)


def one_line(fragments: list[str]) -> list[str]:
    return [fragment for fragment in fragments if not any(c in fragment for c in LINE_BREAKS)]


# What a JSON conf can carry: any text, lone surrogates ("\ud800") included.
hostile_text = hostile(st.characters(exclude_categories=()))
# A run id Airflow stores in its database: text without a lone surrogate (an installation may allow more than the
# default pattern's characters).
run_ids = hostile(st.characters(codec="utf-8"))
# Values for the script: half of them one line of valid text, which extra_env accepts, so that most examples reach it.
script_values = st.one_of(
    hostile(st.characters(codec="utf-8", exclude_characters=LINE_BREAKS), one_line(INJECTIONS), one_line(PIECES)),
    hostile_text,
)
# Variables bash sets, reads or computes itself, beside well-formed names of any kind.
SHELL_VARIABLES = [
    *("_", "SECONDS", "LINENO", "BASHPID", "EPOCHSECONDS", "EPOCHREALTIME", "GROUPS", "FUNCNAME", "DIRSTACK"),
    *("SHLVL", "PWD", "OLDPWD", "PIPESTATUS", "HOSTNAME", "OPTARG", "REPLY", "TMOUT", "FUNCNEST", "HISTSIZE"),
    *("BASH", "COLUMNS", "LINES", "GLOBIGNORE", "CDPATH", "POSIXLY_CORRECT", "LC_ALL", "NCCL_DEBUG", "HF_TOKEN"),
]
env_names = st.one_of(st.sampled_from(SHELL_VARIABLES), st.from_regex(r"[A-Z_][A-Z0-9_]{0,12}", fullmatch=True))
hostlist_items = st.from_regex(r"[a-z][a-z0-9_.-]{0,6}(\[[0-9]{1,2}([-,][0-9]{1,2})?\])?", fullmatch=True)
hostlists = st.one_of(st.just(""), st.lists(hostlist_items, min_size=1, max_size=3).map(",".join), hostile_text)
TRAIN_TEXT_FIELDS = ["recipe", "instance_type", "dataset_uri", "resume_from", "exclude_nodes"]


def assert_refused_by_name(err: ParamsError, field: str, value: object | None = None) -> None:
    """Every problem of ``err`` is ``field``'s (the rest of the conf is valid), and names ``value`` where given."""
    message = str(err)
    problems = message.removeprefix("invalid parameters:\n").split("\n")
    assert message.startswith("invalid parameters:\n") and all(p.startswith(field) for p in problems), message
    if value is not None:
        assert any(f"got {repr(value)[:40]}" in p for p in problems), message


@CI
@given(field=st.sampled_from(TRAIN_TEXT_FIELDS), value=hostile_text)
def test_a_train_text_field_is_refused_by_name_or_kept_exactly(field: str, value: str) -> None:
    assert_refused_by_name_or_kept(validate_params, field, value)


@CI
@given(field=st.sampled_from(["slurm_conn_id", "python", "instance_type", "exclude_nodes"]), value=hostile_text)
def test_a_validate_cluster_text_field_is_refused_by_name_or_kept_exactly(field: str, value: str) -> None:
    assert_refused_by_name_or_kept(validate_cluster_params, field, value)


def assert_refused_by_name_or_kept(parse: Callable[[dict[str, Any]], Any], field: str, value: str) -> None:
    """The form's ``parse`` of ``{field: value}`` refuses it naming only that field, or keeps the value exactly."""
    try:
        params = parse({field: value})
    except ParamsError as err:
        assert_refused_by_name(err, field, value)
    else:
        assert getattr(params, field) == value


@CI
@given(name=st.one_of(env_names, hostile_text), value=hostile_text)
def test_an_extra_env_variable_is_refused_by_name_or_kept_exactly(name: str, value: str) -> None:
    try:
        params = validate_params({"extra_env": {name: value}})
    except ParamsError as err:
        assert_refused_by_name(err, "extra_env")  # its value may be a token: never shown
    else:
        assert params.extra_env == {name: value}


@CI
@given(
    env=st.dictionaries(env_names, script_values, min_size=1, max_size=3),
    exclude_nodes=hostlists,
    run_id=run_ids,
)
def test_the_training_script_runs_no_typed_command_and_exports_every_value_exactly(
    env: dict[str, str], exclude_nodes: str, run_id: str
) -> None:
    """The script prepare_training writes for an accepted conf passes ``bash -n``; run with Slurm's stand-ins in an
    otherwise empty environment, it starts the training step with each extra_env variable at its value, byte for
    byte, and no command a value holds runs (none creates a file in the job's directory)."""
    try:
        params = validate_params({"platform": "local", "extra_env": env, "exclude_nodes": exclude_nodes})
    except ParamsError:
        reject()  # refused before anything exists: what the tests above check
    spec = run_spec(params, "train_e2e", run_id)
    with tempfile.TemporaryDirectory() as tmp:
        root, work = Path(tmp), Path(tmp) / "work"
        work.mkdir()
        cluster = {"platform": "local", "scheduler": "slurm", "shared_dir": str(root / "fsx")}
        job = jobs.prepare_training(spec, cluster, {"python": "/usr/bin/python3"}, {"train_bin": "/fsx/train.bin"})
        script = job["script_path"]
        subprocess.run(["bash", "-n", script], check=True)
        subprocess.run(["bash", script], capture_output=True, cwd=work, env=fake_slurm(root), check=True)
        assert list(work.iterdir()) == []
        # srun's environment, as the stand-in recorded it: one variable a line (extra_env values have no line break).
        lines = (root / "srun.env").read_bytes().split(b"\n")[:-1]
        started_with = dict(line.split(b"=", 1) for line in lines)
        assert {name: started_with.get(name.encode()) for name in env} == {n: v.encode() for n, v in env.items()}
        sbatch_lines = Path(script).read_text().split("\n")
        excluded = [shlex.split(line.removeprefix("#SBATCH ")) for line in sbatch_lines if "#SBATCH --exclude" in line]
        assert excluded == ([[f"--exclude={exclude_nodes}"]] if exclude_nodes else [])
