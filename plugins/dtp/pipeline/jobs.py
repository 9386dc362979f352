"""Write a run's job files to the cluster's shared filesystem: the JSON config, and the batch script on Slurm, the
PyTorchJob manifest on EKS, or the job on the run's job definition on AWS Batch.

The trainer reads every value from the JSON config, the batch script's values
are shell-quoted by the template engine and the manifest's are JSON, so nothing
a person typed is ever parsed by a shell.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dtp.costs import RunFsx, checkpoint_write_seconds, training_time_limit_minutes
from dtp.hooks.shared_fs import SharedFilesystemHook
from dtp.hooks.slurm import SlurmHook
from dtp.hostlist import compress_hostlist
from dtp.metrics.preflight_gate import checked_nodes
from dtp.metrics.preflight_job import node_results_dir, status_path
from dtp.naming import EXPIRES_TAG, INSTALLATION_TAG, slurm_comment
from dtp.params import NODES_OUTLIVE_RUNS
from dtp.pipeline import frameworks
from dtp.pipeline.run_dirs import claim_run_dir, run_dir
from dtp.platforms import get_platform
from dtp.platforms.base import PREFLIGHT_DEADLINE_S, PlatformNotReady, PyTorchJobPlatform
from dtp.platforms.capacity import instance_of
from dtp.recipes import INCLUDE_DIR, Recipe
from dtp.templates import render

TRAINING_DIR = INCLUDE_DIR / "training"
# Where the reference repo's AMIs and containers install nccl-tests; an image may say otherwise.
NCCL_TESTS_BIN = "/opt/nccl-tests/build"
# Where aws-neuronx-tools installs nccom-test on a Neuron AMI; an image may say otherwise.
NCCOM_TEST_BIN = "/opt/aws/neuron/bin"
# A preflight job's time on Slurm: pyxis importing the image on each node (minutes for a large one on a node that
# has not imported it yet), the screen and the sweep. A job stopped there is not retried.
SLURM_PREFLIGHT_MINUTES = 30
# About how often the trainer's ranks agree on a SIGTERM: well within torchrun's 30 s before it kills them.
STOP_CHECK_SECONDS = 5
# Seconds a stop ahead of the time limit allows besides the checkpoint's write and the step it follows: the stop
# check, the save's barriers, meta.json and the rename, the old checkpoint's deletion, torchrun ending.
STOP_MARGIN_SECONDS = 60
# What a framework's training job may stay silent besides a checkpoint's expected write (``hang_timeout_seconds``).
HANG_MARGIN_SECONDS = 300


def container_options(images: dict[str, Any], shared_dir: str, workdir: str | None = None) -> list[str]:
    """srun's options to run a step in the runtime's container (enroot + pyxis); none for a runtime on the host.
    ``workdir``: where the step starts in the container, which is otherwise the image's working directory, not the
    batch script's."""
    if images.get("container_runtime") != "pyxis":
        return []
    options = [f"--container-image={images['image']}", f"--container-mounts={shared_dir}:{shared_dir}"]
    return [*options, f"--container-workdir={workdir}"] if workdir else options


def enroot_login(images: dict[str, Any], workdir: Path) -> dict[str, Any] | None:
    """What the job's preamble gives enroot to import the runtime's image: the run's folder of enroot config
    folders, one per job (``$ENROOT_CONFIG_PATH``), and the line of their ``.credentials``; None when the registry
    needs no login (``dtp.platforms.pyxis.enroot_credentials``) or no container is imported."""
    credentials = images.get("enroot_credentials")
    return {"config_dir": workdir / "enroot", "credentials": credentials} if credentials else None


def _common(spec: dict[str, Any], images: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    instance = instance_of(spec, cluster)
    on_cpu = instance["accelerator"] == "cpu"
    return {
        "num_nodes": spec["params"]["num_nodes"],
        "procs_per_node": instance["accelerators_per_node"],
        "python": images["python"],
        "omp_threads": 1 if on_cpu else 8,
        "env": spec["params"]["extra_env"],
        "exclude_nodes": spec["params"]["exclude_nodes"],
        "container": container_options(images, cluster["shared_dir"]),
        "enroot_login": enroot_login(images, run_dir(spec, cluster)),
    }


def _programs(hook: SlurmHook, images: dict[str, Any], workdir: Path) -> Path:
    """Where the nodes find the training programs: inside the image when it carries them, include/training when
    the cluster shares this host, else a copy the task writes to the run's directory on the shared filesystem."""
    if images.get("training_dir"):
        return Path(images["training_dir"])
    if hook.transport == "local":
        return TRAINING_DIR
    return _stage_programs(hook, workdir)


def _stage_programs(files: SharedFilesystemHook, workdir: Path) -> Path:
    staged = workdir / "programs"
    for program in sorted(TRAINING_DIR.glob("*.py")):
        files.write_file(str(staged / program.name), program.read_text())
    return staged


def _prepare_off_slurm(
    spec: dict[str, Any], cluster: dict[str, Any], images: dict[str, Any], kind: str
) -> dict[str, Any]:
    """The run's ``kind`` job (preflight, train) where the scheduler is not Slurm, as its operator takes it: a
    PyTorchJob manifest on EKS, a job on the run's job definition on Batch. The programs are staged into the run's
    folder on FSx when the image does not carry them."""
    if not images.get("training_dir"):
        _stage_programs(SharedFilesystemHook.of_cluster(cluster), run_dir(spec, cluster))
    platform = get_platform(cluster["platform"])  # its module loads here, never when a DAG is parsed
    if cluster["scheduler"] == "kubernetes" and isinstance(platform, PyTorchJobPlatform):
        from dtp.platforms.pytorchjob_manifest import manifest_problems

        manifest = platform.pytorchjobs(spec, images)["preflight.yaml" if kind == "preflight" else "pytorchjob.yaml"]
        if problems := manifest_problems(manifest):
            raise PlatformNotReady(f"the run's {kind} PyTorchJob is invalid:\n" + "\n".join(problems))
        return {"manifest": manifest, "cluster_name": cluster["eks_cluster_name"]}
    from dtp.platforms.batch import BatchPlatform

    batch = BatchPlatform()
    return {
        "job_name": f"{spec['names']['run_key']}-{kind}",
        "job_queue": cluster["job_queue"],
        "job_definition": batch.register_job_definition(spec, images),
        "node_overrides": batch.preflight_overrides(spec, images) if kind == "preflight" else None,
        # Training's limit is the definition's (budget_usd); the preflight's is its own.
        "timeout_s": PREFLIGHT_DEADLINE_S if kind == "preflight" else None,
        "tags": spec["tags"],
    }


def _write_job(
    hook: SlurmHook, spec: dict[str, Any], workdir: Path, kind: str, script: str, job_name: str, nodelist: str = ""
) -> dict[str, Any]:
    """Write the batch script and its log folder; return what the Slurm operator needs to submit it. The script is
    its owner's alone: it exports the run's extra_env, which may hold tokens, and sbatch reads it as that user.
    ``nodelist``: the nodes the operator submits the job to (``pinned_nodes``; "": any of the partition's)."""
    script_path = workdir / f"{kind}.sbatch"
    hook.write_file(str(script_path), script, mode=0o700)
    hook.make_dirs(str(workdir / "logs"))
    return {
        "slurm_conn_id": hook.slurm_conn_id,
        "head_node": hook.head_node,
        "head_node_host_keys": hook.head_node_host_keys,
        "script_path": str(script_path),
        "output_path": str(workdir / "logs" / f"{kind}-%j.out"),
        "job_name": job_name,
        "comment": slurm_comment(
            spec["tags"][EXPIRES_TAG], spec["dag_id"], spec["run_id"], spec["tags"].get(INSTALLATION_TAG, "")
        ),
        # The operator reuses no job submitted before the run's spec was made (a spec from before has no time).
        "submitted_after": spec.get("created_at"),
        "nodelist": nodelist,
    }


def prepare_preflight(spec: dict[str, Any], cluster: dict[str, Any], images: dict[str, Any]) -> dict[str, Any]:
    """The preflight job. ``nccl_tests_path`` is where the instance type's collective test (nccl-tests or
    nccom-test, on Slurm) writes its output, empty where torch's all-reduce sweep measures the bus bandwidth."""
    workdir = claim_run_dir(spec, cluster)  # validate_cluster's first write there (train_e2e's is stage_data)
    hang_timeout_s = spec["params"]["hang_timeout_minutes"] * 60  # it writes no checkpoint
    results = workdir / "preflight.json"
    if cluster["scheduler"] != "slurm":  # torch's all-reduce sweep measures the bus bandwidth
        job = _prepare_off_slurm(spec, cluster, images, "preflight")
        return {**job, "results_path": str(results), "nccl_tests_path": "", "hang_timeout_s": hang_timeout_s}
    hook = SlurmHook.of_cluster(cluster)
    instance = instance_of(spec, cluster)
    nccl_tests = workdir / "nccl-tests.out" if instance["collective_test"] == "nccl-tests" else None
    nccom_test = workdir / "nccom-test.out" if instance["collective_test"] == "nccom-test" else None
    script = render(
        "slurm/preflight.sbatch.j2",
        **_common(spec, images, cluster),
        program=_programs(hook, images, workdir) / "preflight.py",
        results_path=results,
        node_results_dir=node_results_dir(str(results)),
        status_path=status_path(str(results)),
        # The job's, not each rank's: a node whose torch lacks CUDA fails on its own instead of choosing gloo.
        backend="nccl" if instance["collective_test"] == "nccl-tests" else "gloo",
        max_bytes=instance["busbw_at_bytes"],
        nccl_tests_path=nccl_tests or "",
        nccl_tests_bin=images.get("nccl_tests_bin", NCCL_TESTS_BIN),
        nccom_test_path=nccom_test or "",
        nccom_test_bin=images.get("nccom_test_bin", NCCOM_TEST_BIN),
        time_minutes=SLURM_PREFLIGHT_MINUTES,
    )
    job = _write_job(hook, spec, workdir, "preflight", script, f"{spec['names']['slurm_job']}-preflight")
    collective_test_path = str(nccl_tests or nccom_test or "")
    return {
        **job,
        "results_path": str(results),
        "nccl_tests_path": collective_test_path,
        "hang_timeout_s": hang_timeout_s,
    }


def recorded_fsx(spec: dict[str, Any]) -> RunFsx | None:
    """The FSx for Lustre DTP makes for the run, as its spec records it (``dtp.pipeline.spec.run_fsx``), whose write
    speed the run's estimates and time limit count on; None where the run's file system is not DTP's to size, and in
    a spec from before the estimates counted FSx (whose estimates took the smallest one's speed, as None does)."""
    return RunFsx(**spec["fsx"]) if spec.get("fsx") else None


def stop_signal_seconds(spec: dict[str, Any], recipe: Recipe) -> int:
    """Seconds before the training job's time limit that Slurm signals its batch script, which asks the trainer to
    stop (``stop_file``): enough for the step in progress, the ranks' stop check and the checkpoint's write to the
    run's file system (at the speed its time limit was worked out with), with ``STOP_MARGIN_SECONDS`` to spare.
    SIGTERM at the limit leaves torchrun's 30 s, too few for a large model's save. Slurm may send the signal up to a
    minute earlier than asked, never later (``recipe`` is the spec's)."""
    step = math.ceil(recipe.expected_step_seconds) + STOP_CHECK_SECONDS
    return checkpoint_write_seconds(recipe, recorded_fsx(spec)) + step + STOP_MARGIN_SECONDS


def hang_timeout_seconds(spec: dict[str, Any], recipe: Recipe) -> int:
    """Seconds without a new log line before the run's training job counts as hung: the form's
    ``hang_timeout_minutes``; for a framework other than DTP's trainer (which prints while it saves) at least a
    checkpoint's expected write to the run's file system and ``HANG_MARGIN_SECONDS``, as those print nothing while
    they write one (``recipe`` is the spec's)."""
    asked = spec["params"]["hang_timeout_minutes"] * 60
    if recipe.framework == "fsdp":
        return int(asked)
    return max(int(asked), checkpoint_write_seconds(recipe, recorded_fsx(spec)) + HANG_MARGIN_SECONDS)


def training_config(
    spec: dict[str, Any], recipe: Recipe, workdir: str, data: dict[str, Any], instance: dict[str, Any]
) -> dict[str, Any]:
    """DTP's trainer's config (include/training/train.py ``TrainConfig``) for the run on ``instance``'s nodes
    (``recipe`` is the spec's)."""
    params = spec["params"]
    return {
        "run_name": spec["names"]["run_key"],
        "model": recipe.model,
        "data_path": data["train_bin"],
        "checkpoint_dir": f"{workdir}/checkpoints",
        "metrics_path": f"{workdir}/metrics.jsonl",
        "seq_len": recipe.seq_len,
        "micro_batch": recipe.micro_batch,
        "max_steps": params["max_steps"],
        "lr": recipe.lr,
        "warmup_steps": recipe.warmup_steps,
        "checkpoint_interval": params["checkpoint_interval"],
        # A hundred step lines a run, and one at least every quarter of the hang timeout at the recipe's step time:
        # between them rank 0 prints nothing, and a long run's silence would be taken for a hang.
        "log_interval": max(
            1,
            min(params["max_steps"] // 100, int(hang_timeout_seconds(spec, recipe) / 4 / recipe.expected_step_seconds)),
        ),
        "precision": recipe.precision,
        "activation_checkpointing": recipe.activation_checkpointing,
        "compile": recipe.compile,
        "profile_steps": params["profile_steps"],
        "profile_dir": f"{workdir}/profile",
        "peak_flops": instance["peak_flops"],
        # A GPU node whose torch cannot use CUDA fails the launch, instead of training on its CPUs all budget long.
        "device": "auto" if instance["accelerator"] == "cpu" else "cuda",
        # A collective every step would cost a short step much of its time.
        "stop_check_steps": max(1, round(STOP_CHECK_SECONDS / recipe.expected_step_seconds)),
        "stop_file": f"{workdir}/train.stop",
        # A save's collectives wait for the slowest rank's writes: twice the expected write, and never less than
        # the trainer's default.
        "checkpoint_timeout_s": max(1800, 2 * checkpoint_write_seconds(recipe, recorded_fsx(spec))),
    }


def priced_for(spec: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the training time ``budget_usd`` pays for on the nodes the cluster got: a capacity fallback's
    instance type may cost more per hour than the one the run asked for."""
    params, price = spec["params"], instance_of(spec, cluster)["price_usd_per_hour"]
    minutes = training_time_limit_minutes(
        params["budget_usd"],
        params["num_nodes"],
        price,
        params["expiry_hours"],
        params["pending_timeout_minutes"],
        recorded_fsx(spec),
    )
    return {**spec, "training_time_limit_minutes": minutes}


def pinned_nodes(spec: dict[str, Any], preflight: dict[str, Any] | None) -> str:
    """The Slurm hostlist the training job is pinned to (sbatch ``--nodelist``): on a cluster whose nodes outlive
    runs, which may have idle nodes besides, the nodes the run's preflight checked (``preflight``, its gate's
    result), so that training runs on no node the gate did not pass. "" (any of the partition's nodes) without a
    preflight result, and on a cluster made for the run: it has the run's nodes alone, all of which preflight
    checked, and a node put in place of a failed one (HyperPod's auto-resume) has a name preflight never saw."""
    if preflight is None or spec["params"]["platform"] not in NODES_OUTLIVE_RUNS:
        return ""
    return compress_hostlist(checked_nodes(preflight))


def prepare_training(
    spec: dict[str, Any],
    cluster: dict[str, Any],
    images: dict[str, Any],
    data: dict[str, Any],
    preflight: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training job, on the nodes ``preflight`` (the preflight gate's result, None where none ran) checked
    where ``pinned_nodes`` pins it; what its operator needs to run it."""
    spec, recipe = priced_for(spec, cluster), Recipe.model_validate(spec["recipe"])
    nodelist = pinned_nodes(spec, preflight)
    if recipe.framework != "fsdp":
        return _prepare_framework_training(spec, recipe, cluster, images, nodelist)
    workdir, instance = run_dir(spec, cluster), instance_of(spec, cluster)
    config = training_config(spec, recipe, str(workdir), data, instance)
    config_path = workdir / "train.json"
    profile_dir = config["profile_dir"] if spec["params"]["profile_steps"] > 0 else ""
    outputs = {
        "metrics_path": config["metrics_path"],
        "checkpoint_dir": config["checkpoint_dir"],
        "profile_dir": profile_dir,
        "time_limit_minutes": spec["training_time_limit_minutes"],
        "hang_timeout_s": hang_timeout_seconds(spec, recipe),
    }
    SharedFilesystemHook.of_cluster(cluster).write_file(str(config_path), json.dumps(config, indent=1))
    if cluster["scheduler"] != "slurm":
        return _prepare_off_slurm(spec, cluster, images, "train") | outputs
    hook = SlurmHook.of_cluster(cluster)
    on_gpu = instance["accelerator"] != "cpu"
    script = render(
        "slurm/train.sbatch.j2",
        **_common(spec, images, cluster),
        program=_programs(hook, images, workdir) / "train.py",
        config_path=config_path,
        max_restarts=3,
        # Nsight Systems only where there are GPUs to trace; torch.profiler traces everywhere.
        nsys_dir=profile_dir if on_gpu else "",
        # A stop ahead of the time limit where a save needs it: a CPU node's models save within SIGTERM's 30 s.
        stop_signal_s=stop_signal_seconds(spec, recipe) if on_gpu and spec["training_time_limit_minutes"] else 0,
        stop_file=config["stop_file"],
    )
    return _write_job(hook, spec, workdir, "train", script, spec["names"]["slurm_job"], nodelist) | outputs


def _prepare_framework_training(
    spec: dict[str, Any], recipe: Recipe, cluster: dict[str, Any], images: dict[str, Any], nodelist: str
) -> dict[str, Any]:
    """The batch script of a framework other than DTP's trainer (``dtp.pipeline.frameworks``); its metrics are the
    step lines of its own log, read by that framework's parser. Its steps start in the run's directory, as the
    script does (picotron reads files relative to it); the job is submitted to ``nodelist`` (``pinned_nodes``)."""
    hook = SlurmHook.of_cluster(cluster)
    workdir = run_dir(spec, cluster)
    args = frameworks.template_args(spec, images, str(workdir), cluster["shared_dir"])
    common = {
        **_common(spec, images, cluster),
        "container": container_options(images, cluster["shared_dir"], str(workdir)),
    }
    script = render(frameworks.TEMPLATES[recipe.framework], **common, **args)
    job = _write_job(hook, spec, workdir, "train", script, spec["names"]["slurm_job"], nodelist)
    return {
        **job,
        "metrics_path": args["log_path"],
        "checkpoint_dir": args["checkpoint_dir"],
        "profile_dir": "",
        "time_limit_minutes": spec["training_time_limit_minutes"],
        "hang_timeout_s": hang_timeout_seconds(spec, recipe),
    }
