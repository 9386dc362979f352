"""dtp.templates: every template renders with StrictUndefined, and shell templates quote every value (the preflight
job's template: test_templates_preflight.py; the training job's: test_templates_training.py)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jinja2
import pytest
from templates_support import CONTEXTS, SHELL_TEMPLATES, fake_slurm

from dtp.pipeline.frameworks import dataset_dir
from dtp.recipes import get_recipe
from dtp.templates import TEMPLATE_DIR, UnsafeTemplateValue, render

# Platform documents, rendered and validated against their services' schemas by each platform's own tests.
PLATFORM_TEMPLATES = {
    "eks/pytorchjob.yaml.j2": "test_platform_eks.py",
    "parallelcluster/cluster-config.yaml.j2": "test_parallelcluster_config.py",
}


def test_every_template_has_a_test_context() -> None:
    found = {str(p.relative_to(TEMPLATE_DIR)) for p in TEMPLATE_DIR.rglob("*.j2")}
    assert found - set(PLATFORM_TEMPLATES) == set(CONTEXTS)
    assert all((Path(__file__).parent / test).exists() for test in PLATFORM_TEMPLATES.values())


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_template_renders(name: str) -> None:
    text = render(name, **CONTEXTS[name])
    assert text.endswith("\n")
    assert "{{" not in text and "{%" not in text


@pytest.mark.parametrize("name", list(CONTEXTS))
def test_missing_variable_raises(name: str) -> None:
    context = dict(CONTEXTS[name])
    for key in context:
        partial = {k: v for k, v in context.items() if k != key}
        with pytest.raises(jinja2.UndefinedError, match=key):
            render(name, **partial)


@pytest.mark.parametrize("name", SHELL_TEMPLATES)
def test_shell_templates_pass_bash_syntax_check(name: str) -> None:
    text = render(name, **CONTEXTS[name])
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_train_script_content() -> None:
    text = render("slurm/train.sbatch.j2", **CONTEXTS["slurm/train.sbatch.j2"])
    assert text.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2\n" in text
    assert "#SBATCH --requeue\n" in text
    assert "#SBATCH --exclusive\n" in text  # whole nodes, as the framework templates and the reference FSDP job
    assert "set -euo pipefail\n" in text
    assert "export NCCL_DEBUG=INFO\n" in text
    assert "export OMP_NUM_THREADS=1\n" in text
    assert "ATTEMPTS=4\n" in text  # max_restarts=3: four fresh launches at most
    assert "--max-restarts=0" in text
    assert "/fsx/training/train.py --config /fsx/runs/r/train.json" in text


@pytest.mark.parametrize("recipe", ["llama3_1_8b_torchtitan", "llama3_2_1b_picotron"])
def test_jobs_that_load_the_dataset_keep_datasets_cache_on_the_shared_filesystem_beside_the_mirror(recipe: str) -> None:
    framework = get_recipe(recipe).framework
    name = f"slurm/train_{framework}.sbatch.j2"
    text = render(name, **CONTEXTS[name])
    mirror = dataset_dir("/fsx", framework, f"s3://datasets/{framework}/")
    # Beside the mirror, not in it: the mirror's stale-file removal would delete it.
    exports = [line for line in text.splitlines() if line.startswith("export HF_DATASETS_CACHE=")]
    assert exports == [f"export HF_DATASETS_CACHE={mirror}.hf_datasets_cache"]
    assert mirror.startswith("/fsx/datasets/")
    assert text.index(exports[0]) < text.index("srun --kill-on-bad-exit=1")


def test_slurm_conf_is_not_shell_quoted() -> None:
    text = render("slurm/slurm.conf.j2", **CONTEXTS["slurm/slurm.conf.j2"])
    assert "StateSaveLocation=/var/dtp/slurm/ctld\n" in text
    assert "AuthInfo=socket=/var/dtp/munge/munge.socket\n" in text
    assert "NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16001 CPUs=2" in text
    assert "PartitionName=compute Nodes=n1,n2 " in text
    assert "'" not in text


# --- injection ------------------------------------------------------------------------------------


def hostile_context(tmp_path: Path) -> dict[str, Any]:
    return {
        **CONTEXTS["slurm/train.sbatch.j2"],
        "env": {
            "NCCL_DEBUG": f"INFO; touch {tmp_path}/p1",
            "SUBST": f"$(touch {tmp_path}/p2)",
            "BACKTICK": f"`touch {tmp_path}/p3`",
            "QUOTE": f"x'; touch {tmp_path}/p4; echo '",
            "MIXED": 'a"b $HOME \\ * ~ & |',
            "EMPTY": "",
        },
        "config_path": Path(tmp_path) / "a b" / "$(id)" / "c.json",
        "python": f"{tmp_path}/py thon",
        "nsys_dir": "",
    }


def test_dangerous_values_appear_only_single_quoted(tmp_path: Path) -> None:
    context = hostile_context(tmp_path)
    text = render("slurm/train.sbatch.j2", **context)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    for value in (context["env"]["NCCL_DEBUG"], context["env"]["SUBST"], str(context["config_path"])):
        quoted = shlex.quote(value)
        assert quoted == f"'{value}'"
        assert text.count(value) == text.count(quoted) >= 1, value
    export = next(line for line in text.splitlines() if line.startswith("export NCCL_DEBUG="))
    assert shlex.split(export) == ["export", f"NCCL_DEBUG=INFO; touch {tmp_path}/p1"]
    launch = text[text.index("srun ") : text.index(" &\n")].replace("\\\n", " ")
    argv = shlex.split(launch)
    assert argv[argv.index("--config") + 1] == str(context["config_path"])
    assert argv[1:3] == ["--kill-on-bad-exit=1", f"{tmp_path}/py thon"]


def test_export_lines_set_values_verbatim_without_side_effects(tmp_path: Path) -> None:
    context = hostile_context(tmp_path)
    text = render("slurm/train.sbatch.j2", **context)
    exports = [line for line in text.splitlines() if line.startswith("export ")]
    names = list(context["env"])
    dump = " ".join(f'"${name}"' for name in names)
    script = "\n".join([*exports, f"printf '%s\\0' {dump}"])
    out = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path, env={"PATH": os.defpath}
    )
    assert out.stdout.split("\0")[:-1] == [context["env"][n] for n in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_whole_train_script_runs_with_hostile_values_and_passes_them_as_single_arguments(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    context = hostile_context(work)
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm/train.sbatch.j2", **context))
    out = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, cwd=work, env=fake_slurm(tmp_path), check=True
    )
    assert '"rdzv": "10.0.0.7:28639"' in out.stdout  # 20000 + (1234 * 7 + 1) % 20000, first attempt
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert argv[argv.index("--config") + 1] == str(context["config_path"])
    assert "--rdzv_endpoint=10.0.0.7:28639" in argv and "--rdzv_id=1234-1" in argv
    env = (tmp_path / "srun.env").read_text()
    assert f"NCCL_DEBUG=INFO; touch {work}/p1\n" in env
    assert list(work.iterdir()) == []  # no pN file: nothing was executed


def test_value_with_newline_cannot_escape_a_comment(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    context = {**CONTEXTS["slurm/train.sbatch.j2"], "num_nodes": f"2\ntouch {work}/pwned #"}
    with pytest.raises(UnsafeTemplateValue, match="line break"):
        render("slurm/train.sbatch.j2", **context)
    assert list(work.iterdir()) == []


def test_excluded_nodes_reach_sbatch_and_nothing_is_excluded_by_default() -> None:
    for name in ("slurm/train.sbatch.j2", "slurm/preflight.sbatch.j2"):
        assert "#SBATCH --exclude='n[3-4]'\n" in render(name, **CONTEXTS[name])
        assert "--exclude" not in render(name, **{**CONTEXTS[name], "exclude_nodes": ""})


@pytest.mark.parametrize("name", [name for name in SHELL_TEMPLATES if name.endswith(".sbatch.j2")])
def test_every_job_runs_python_unbuffered(name: str) -> None:
    """Log lines reach the job's log as they are printed, not in 8 KiB bursts whose last one a killed step loses."""
    assert "\nexport PYTHONUNBUFFERED=1\n" in render(name, **CONTEXTS[name])


def test_the_training_step_gets_python_unbuffered(tmp_path: Path) -> None:
    script = tmp_path / "train.sbatch"
    script.write_text(render("slurm/train.sbatch.j2", **CONTEXTS["slurm/train.sbatch.j2"]))
    subprocess.run(["bash", str(script)], capture_output=True, cwd=tmp_path, env=fake_slurm(tmp_path), check=True)
    assert "PYTHONUNBUFFERED=1" in (tmp_path / "srun.env").read_text().splitlines()
