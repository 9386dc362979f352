"""The rules for a run's ``extra_env``: the variables it may set in the run's jobs, and its values masked in the logs.

A variable the pipeline, the job scripts, Slurm, torchrun or the shell set or read themselves is refused, and so is
one that has a loader or a library (NCCL's plugins) load code from a path of the run's choosing; the values may be
tokens, so no message names them and every process that logs or renders them masks them (``mask_extra_env``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from airflow.sdk.log import mask_secret

ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}$")
# Variables the pipeline, the job scripts (include/templates/slurm), Slurm, torchrun or the shell set or read
# themselves; overriding one would break the launch (RDZV_HOST would move the rendezvous, IFS the scripts' loops).
RESERVED_ENV = frozenset(
    {
        *("PATH", "HOME", "USER", "IFS", "SHELL", "PS4"),
        # bash's read-only variables: exporting one ends the job script under set -e; and those bash evaluates as
        # arithmetic, where a value that is not a number does the same.
        *("UID", "EUID", "PPID", "SHELLOPTS", "BASHOPTS", "RANDOM", "SRANDOM", "OPTIND", "HISTCMD"),
        # Variables bash sets or computes itself as it runs (the last command's path, the seconds since it started,
        # the directory, the nesting of shells, ...): a job's processes would not get the value the run gave.
        *("_", "SECONDS", "LINENO", "BASHPID", "EPOCHSECONDS", "EPOCHREALTIME", "GROUPS", "FUNCNAME", "DIRSTACK"),
        *("PIPESTATUS", "BASH", "SHLVL", "PWD", "OLDPWD"),
        *("RDZV_HOST", "RDZV_PORT", "FIRST_NODE", "ATTEMPT", "ATTEMPTS", "LATEST", "LOAD_PATH", "NSYS", "TRAIN"),
        *("LAUNCH", "STATUS", "STOP_FILE", "NCCOM_HOSTS", "NEURON_RT_ROOT_COMM_ID"),
        *("DTP_PREFLIGHT_NODE_RESULTS", "DTP_PREFLIGHT_BACKEND"),
        *("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"),
    }
)
RESERVED_ENV_PREFIXES = ("SLURM_", "PET_", "TORCHELASTIC_", "BASH_", "AWS_BATCH_")
# Variables that have the dynamic loader, Python, glibc's iconv, CUDA (its injection library), libfabric (its provider
# directory) or the shell load code from a path of the run's choosing (a file dataset_uri mirrored onto the shared
# filesystem, say) into every process of its jobs; the jobs' own code and libraries come from their image.
LOADER_ENV = frozenset(
    {
        *("GCONV_PATH", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "ENV"),
        *("CUDA_INJECTION64_PATH", "FI_PROVIDER_PATH"),
    }
)
LOADER_ENV_PREFIXES = ("LD_",)
# Variables that name a plugin library (NCCL_NET_PLUGIN, NCCL_TUNER_PLUGIN, NCCL_PROFILER_PLUGIN, ...): NCCL loads
# libnccl-net-<name>.so (and the like) from the image for a name such as aws-ofi, but the file itself for a path.
PLUGIN_ENV_SUFFIX = "_PLUGIN"
# extra_env values that cannot be secrets (a flag, a number): masking one would hide every such word in the logs.
NOT_SECRET = re.compile(r"true|false|yes|no|on|off|[+-]?\d+(\.\d+)?", re.IGNORECASE)


def check_extra_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` as extra_env, or ``ValueError`` naming the first variable it may not set (never a value)."""
    if len(env) > 64:
        raise ValueError(f"at most 64 variables are allowed, got {len(env)}")
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"variable name {name!r} must match {ENV_NAME.pattern}")
        if name in LOADER_ENV or name.startswith(LOADER_ENV_PREFIXES):
            raise ValueError(
                f"variable {name!r} cannot be set: it has the dynamic loader, Python, iconv, CUDA, libfabric or the "
                "shell load code from a path of the run's choosing into the job's processes, whose code and "
                "libraries come from its image"
            )
        if name.endswith(PLUGIN_ENV_SUFFIX) and "/" in value:
            raise ValueError(
                f"variable {name!r} cannot be set to a path: its library loads the plugin a path names into the "
                "job's processes, whose code and libraries come from its image; give the name of a plugin the image "
                "has (such as aws-ofi or none)"
            )
        if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
            raise ValueError(
                f"variable {name!r} is set by the pipeline, Slurm or the job's shell and cannot be overridden"
            )
        if len(value) > 4096 or any(c in value for c in "\0\n\r"):
            raise ValueError(f"value of {name!r} must be one line of at most 4096 characters")
        if not _is_unicode(value):
            raise ValueError(f"value of {name!r} must be Unicode text: it has a lone surrogate (such as \\ud800)")
    return env


def _is_unicode(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8, as the job script that exports it is written: a JSON conf can carry a lone
    surrogate (``"\\ud800"``), which no file can hold; the job would fail writing its script, after its cluster."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def describe_extra_env(env: Any) -> str:
    """What extra_env (or one of its values) was, without a value: a mapping's names, else its type. A name that is
    not a variable's is quoted: a line break in it would start a line of its own in the refusal."""
    if isinstance(env, Mapping):
        names = (name if isinstance(name, str) and ENV_NAME.fullmatch(name) else repr(name) for name in env)
        return f"a mapping with {', '.join(names)}" if env else "an empty mapping"
    return f"a value of type {type(env).__name__}"


def mask_extra_env(params: Mapping[str, Any]) -> None:
    """Mask the values of the run's ``extra_env`` (tokens, some) in this process's logs and rendered fields.

    The secrets masker hides a value by its name only in a mapping (``{"HF_TOKEN": ...}``), never in a job's env list
    or its YAML text, so every value is masked; and in each process that logs or renders them, since a retry's worker
    never saw validate_params mask them. A value that cannot be a secret (``false``, ``4``) is not masked: every such
    word of the logs would be.
    """
    mask_secret([value for value in params.get("extra_env", {}).values() if not NOT_SECRET.fullmatch(value)])
