"""extra_env in validate_params: a refusal names the variables but shows no value (a token, some), and variables
that would have the job's processes load code from outside their image are refused, whoever sets them, as are those
bash sets itself."""

from __future__ import annotations

import pytest
from params_support import refuse

from dtp.params import validate_params

LOADER_VARIABLES = [
    *("LD_PRELOAD", "LD_AUDIT", "LD_LIBRARY_PATH", "GCONV_PATH", "ENV"),
    *("PYTHONSTARTUP", "PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE"),
    *("CUDA_INJECTION64_PATH", "FI_PROVIDER_PATH"),
]
PLUGIN_VARIABLES = ["NCCL_NET_PLUGIN", "NCCL_TUNER_PLUGIN", "NCCL_PROFILER_PLUGIN"]


def test_a_refused_extra_env_shows_its_names_not_its_values() -> None:
    message = refuse({"extra_env": {"HF_TOKEN": "hf_SECRET_refused_1", "PATH": "/x"}})
    assert "extra_env: got a mapping with HF_TOKEN, PATH; variable 'PATH' is set by the pipeline" in message
    assert "hf_SECRET" not in message


def test_a_value_of_the_wrong_type_is_not_shown() -> None:
    message = refuse({"extra_env": {"HF_TOKEN": 1234567890}})
    assert "extra_env.HF_TOKEN: got a value of type int; Input should be a valid string" in message
    assert "1234567890" not in message


@pytest.mark.parametrize("name", LOADER_VARIABLES)
def test_variables_that_load_code_from_a_path_are_refused(name: str) -> None:
    message = refuse({"extra_env": {name: "/fsx/runs/r/data/evil.so"}})
    assert (
        f"variable {name!r} cannot be set: it has the dynamic loader, Python, iconv, CUDA, libfabric or the shell load"
        in message
    )
    assert "whose code and libraries come from its image" in message


@pytest.mark.parametrize("name", PLUGIN_VARIABLES)
@pytest.mark.parametrize("path", ["/fsx/runs/r/data/libnccl-net-evil.so", "./libnccl-net-evil.so"])
def test_a_plugin_given_as_a_path_is_refused(name: str, path: str) -> None:
    message = refuse({"extra_env": {name: path}})
    assert (
        f"variable {name!r} cannot be set to a path: its library loads the plugin a path names into the job's "
        "processes, whose code and libraries come from its image; give the name of a plugin the image has (such as "
        "aws-ofi or none)" in message
    )
    assert "evil" not in message


@pytest.mark.parametrize("name", PLUGIN_VARIABLES)
@pytest.mark.parametrize("plugin", ["aws-ofi", "none"])
def test_a_plugin_given_by_name_is_accepted(name: str, plugin: str) -> None:
    assert validate_params({"extra_env": {name: plugin}}).extra_env == {name: plugin}


def test_the_variables_of_nccl_libfabric_torch_cuda_hf_and_openmp_are_accepted() -> None:
    env = {
        "NCCL_DEBUG": "INFO",
        "FI_EFA_USE_DEVICE_RDMA": "1",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "4",
        "PYTHONUNBUFFERED": "1",
    }
    assert validate_params({"extra_env": env}).extra_env == env


@pytest.mark.parametrize("name", ["_", "SECONDS", "LINENO", "PIPESTATUS", "SHLVL", "PWD", "BASH"])
def test_variables_bash_sets_itself_are_refused(name: str) -> None:
    """bash gives these its own values as the job script runs (test_shell_safety_properties.py found them): the
    training step would not get the run's."""
    message = refuse({"extra_env": {name: "1"}})
    assert f"variable {name!r} is set by the pipeline, Slurm or the job's shell and cannot be overridden" in message


def test_a_value_with_a_lone_surrogate_is_refused_without_being_shown() -> None:
    """A JSON conf can carry "\\ud800", which no job script can hold: refused before the cluster exists."""
    message = refuse({"extra_env": {"HF_TOKEN": "hf_SECRET\ud800"}})
    assert "value of 'HF_TOKEN' must be Unicode text: it has a lone surrogate (such as \\ud800)" in message
    assert "hf_SECRET" not in message


def test_a_malformed_name_is_quoted_so_that_the_refusal_keeps_one_problem_a_line() -> None:
    message = refuse({"extra_env": {"A\nrecipe: fine": "1"}})
    assert message.split("\n")[1:] == [
        "extra_env: got a mapping with 'A\\nrecipe: fine'; variable name 'A\\nrecipe: fine' must match "
        "^[A-Z_][A-Z0-9_]{0,63}$"
    ]
