"""The pipelines' parameters: one pydantic model per trigger form, two uses.

``TrainParams`` validates a run's conf inside ``validate_params`` (unknown keys
included, which Airflow itself accepts), and ``dtp.form.airflow_params()`` turns
the same model's JSON schema into the trigger form's typed ``Param``s, so the
form and the validation cannot drift apart. The form models' base and the parsing
of a conf against one are ``dtp.form_params``; the rules for ``extra_env``,
``dtp.params_env``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from dtp.costs import SETUP_HOURS, RunFsx, estimate_cost_usd, estimate_training_hours
from dtp.form_params import FormParams, ParamsError, parse_params
from dtp.hostlist import expand_hostlist
from dtp.params_env import check_extra_env
from dtp.pipeline.frameworks import DATASET_FILES, launch_problem, max_steps_problem
from dtp.recipes import (
    Platform,
    Recipe,
    RecipeError,
    catalogue,
    get_recipe,
    instance_types,
)

# An S3 URI whose key is of S3's safe characters and '=' and '+' (Hive-style partitions such as lang=en/, ds+v2/): none
# a shell gives a meaning to inside a word, and no ',' that would split a list.
S3_URI = r"^$|^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9!_.*'()/=+-]*)?$"

# Platforms whose nodes outlive runs: only there can a run name nodes to keep out of its jobs (exclude_nodes).
NODES_OUTLIVE_RUNS = ("local",)
# Platforms whose jobs can be Kubeflow PyTorchJobs (hyperpod: where its connection names an EKS orchestrator): only
# there can a run ask for a gang scheduler (gang_scheduler); Slurm and AWS Batch start a job's nodes together anyway.
KUBERNETES_PLATFORMS = ("eks", "hyperpod")
# The longest expiry_hours a run may have: the longest its resources live, and so the longest a run may still boot
# nodes from the AMI it resolved when it started (the reaper keeps an AMI SSM pointed at within it).
MAX_EXPIRY_HOURS = 720


class ClusterParams(FormParams):
    """What any job on a cluster takes: its size, instance type, preflight expectations, environment."""

    num_nodes: int = Field(2, ge=1, le=512, title="Nodes", description="Compute nodes the job runs on.")
    instance_type: str = Field(
        "local.cpu",
        title="Instance type",
        description="EC2 instance type of the compute nodes, as in include/instance_types.yaml (local.cpu: the local "
        "profile's CPU nodes); it sets the GPU checks, the bandwidth floor and the price.",
        max_length=32,
        pattern=r"^[a-z0-9]+(-[a-z0-9]+)?\.[a-z0-9]+$",
    )
    hang_timeout_minutes: int = Field(
        10,
        ge=1,
        le=1440,
        title="Hang timeout (minutes)",
        description="Fail a job's task when no log line arrives for this long (Slurm jobs and PyTorchJobs; a Batch "
        "job is bounded by its attempt timeout instead). Another framework's training job gets at least its "
        "checkpoint's expected write and 5 minutes: it prints nothing while it writes one.",
    )
    pending_timeout_minutes: int = Field(
        60,
        ge=0,
        le=10080,
        title="Pending timeout (minutes)",
        description="Fail a job's task when its job has not started this long at a stretch: a Slurm job kept PENDING "
        "(nodes down, more nodes than the partition has) is cancelled, a PyTorchJob whose pods are not running (no "
        "node has room for them) is suspended; 0 waits as long as it takes (a busy shared cluster).",
    )
    expiry_hours: float = Field(
        24,
        gt=0,
        le=MAX_EXPIRY_HOURS,
        title="Expiry (hours)",
        description="Tagged expiry of every resource; the reaper deletes past it.",
    )
    expected_busbw_gbps: float = Field(
        0,
        ge=0,
        le=100_000,
        title="Expected busbw (GB/s)",
        description="Preflight all-reduce bus bandwidth to expect; 0 takes the instance type's figure.",
    )
    exclude_nodes: str = Field(
        "",
        title="Exclude nodes",
        description="Slurm hostlist of nodes to keep out of the jobs (e.g. a node preflight named as bad): n[3-4],n7.",
        max_length=256,
        pattern=r"^[A-Za-z0-9_.,\[\]-]*$",
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict,
        title="Extra environment",
        description='Environment variables for the run\'s jobs, e.g. {"NCCL_DEBUG": "INFO"}.',
    )

    @field_validator("exclude_nodes")
    @classmethod
    def _check_hostlist(cls, expression: str) -> str:
        expand_hostlist(expression)
        return expression

    @field_validator("extra_env")
    @classmethod
    def _check_env(cls, env: dict[str, str]) -> dict[str, str]:
        return check_extra_env(env)


class TrainParams(ClusterParams):
    """What a person may set when triggering a training run."""

    leading: ClassVar[tuple[str, ...]] = (
        "platform",
        "recipe",
        "num_nodes",
        "instance_type",
        "dataset_uri",
        "max_steps",
        "checkpoint_interval",
        "profile_steps",
        "keep_cluster",
        "budget_usd",
    )

    platform: Platform = Field(
        "local",
        title="Platform",
        description="Where the cluster runs: local (emulator + local Slurm), parallelcluster, hyperpod, eks or batch.",
    )
    recipe: str = Field("tiny", title="Recipe", description="Model and size, from include/recipes/*.yaml.")
    dataset_uri: str = Field(
        "",
        title="Dataset S3 URI",
        description=(
            "s3://bucket/prefix/: .txt files for DTP's trainer (empty uses the shipped sample corpus), or, for "
            "another framework's recipe, the dataset in that framework's format (NeMo's recipes read none: empty)."
        ),
        max_length=1024,
        pattern=S3_URI,
    )
    resume_from: str = Field(
        "",
        title="Resume from checkpoint",
        description=(
            "s3://.../runs/<run>/checkpoints/: a checkpoint an earlier run of the same framework and model saved "
            "(its save_checkpoint task); training continues from its step up to Max steps. Empty: from scratch."
        ),
        max_length=1024,
        pattern=S3_URI,
    )
    max_steps: int = Field(300, ge=1, le=1_000_000, title="Max steps", description="Optimizer steps to train.")
    checkpoint_interval: int = Field(
        50, ge=1, le=1_000_000, title="Checkpoint interval", description="Steps between sharded checkpoints."
    )
    profile_steps: int = Field(
        0,
        ge=0,
        le=20,
        title="Profile steps",
        description="Profile this many training steps (torch.profiler traces, plus Nsight Systems on GPU nodes "
        "that have nsys); uploaded with the run. DTP's trainer (fsdp recipes) only. 0 = off.",
    )
    keep_cluster: bool = Field(
        False,
        title="Keep cluster",
        description=(
            "Skip deleting the network and cluster after the run; the expiry tag still lets the reaper remove them."
        ),
    )
    budget_usd: float = Field(
        100.0,
        ge=0,
        le=1_000_000,
        title="Budget (USD)",
        description=(
            "Refuse to start when the run's estimated cost exceeds it (nodes x on-demand price, plus on"
            " parallelcluster the FSx for Lustre it makes for the run at its GiB-month list price, x the recipe's"
            " expected step time x max_steps, plus its checkpoints' writes to the shared file system, plus 10"
            " minutes to start, plus up to 2 h of the cluster's creation, staging, preflight and teardown); the"
            " scheduler stops training once it has run as long as what is left of the budget after those 2 h pays"
            " for on these nodes and that file system."
        ),
    )

    gang_scheduler: Literal["none", "volcano", "scheduler-plugins"] = Field(
        "none",
        title="Gang scheduler",
        description="On Kubernetes (eks, hyperpod with an EKS orchestrator): the scheduler that places all of a "
        "PyTorchJob's pods at once or none, so that runs sharing a cluster cannot each hold part of the nodes the "
        "other waits for. The cluster's training operator must run with --gang-scheduler-name of the same name, and "
        "scheduler-plugins be installed as a second scheduler (scheduler-plugins-scheduler). none: the default "
        "scheduler places the pods one by one.",
    )

    @field_validator("dataset_uri", "resume_from")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        if any(part in (".", "..") for part in uri.removeprefix("s3://").split("/")):
            raise ValueError("path segments '.' and '..' are not allowed")
        return uri


class ValidateParams(ClusterParams):
    """What a person may set when validating an existing Slurm cluster (``validate_cluster``)."""

    leading: ClassVar[tuple[str, ...]] = ("slurm_conn_id", "num_nodes", "instance_type")

    slurm_conn_id: str = Field(
        "slurm_default",
        title="Slurm connection",
        description="Airflow connection of the cluster's head node (slurm_default: the local cluster).",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
    )
    python: str = Field(
        "",
        title="Python on the nodes",
        description="Interpreter with torch on every node; empty: the worker's own, only for a connection whose "
        'transport is "local" (a worker on the cluster, as on the local profile).',
        max_length=256,
        pattern=r"^$|^/[A-Za-z0-9_./-]+$",
    )


def validate_params(
    conf: dict[str, Any], run_fsx: Callable[[TrainParams, Recipe], RunFsx | None] | None = None
) -> TrainParams:
    """Validate a run's conf fully (schema, catalogue, platform, instance type, budget) before anything exists.

    ``run_fsx`` gives the FSx for Lustre the run's platform makes for it (None where it makes none): the estimates
    the expiry and the budget are checked against count its write speed and its cost. Without it the run is taken to
    make none.
    """
    params = parse_params(TrainParams, conf)
    problems = []
    try:
        recipe = get_recipe(params.recipe)
    except RecipeError as err:
        problems.append(f"recipe: got {params.recipe!r}; {err}")
        recipe = None
    instance = instance_types().get(params.instance_type)
    if instance is None:
        problems.append(f"instance_type: got {params.instance_type!r}; allowed: {', '.join(sorted(instance_types()))}")
    elif params.platform not in instance.platforms:
        problems.append(
            f"instance_type: got {params.instance_type!r}; not offered on platform {params.platform!r} "
            f"(allowed there: {', '.join(n for n, i in instance_types().items() if params.platform in i.platforms)})"
        )
    if params.checkpoint_interval > params.max_steps:
        problems.append(
            f"checkpoint_interval: got {params.checkpoint_interval}; must not exceed max_steps ({params.max_steps})"
        )
    if params.profile_steps >= params.max_steps:
        problems.append(
            f"profile_steps: got {params.profile_steps}; must be below max_steps ({params.max_steps}): "
            "profiling starts after the first step, which warms up"
        )
    if recipe is not None and params.profile_steps and recipe.framework != "fsdp":
        problems.append(
            f"profile_steps: got {params.profile_steps}; recipe {params.recipe!r} trains with {recipe.framework}, "
            "and only DTP's trainer (framework fsdp) takes profile_steps"
        )
    if recipe is not None and (problem := launch_problem(recipe)):
        problems.append(f"recipe: got {params.recipe!r}; {problem}")
    if recipe is not None and (problem := max_steps_problem(recipe, params.max_steps)):
        problems.append(f"max_steps: got {params.max_steps}; {problem}")
    if recipe is not None and recipe.framework in DATASET_FILES and not params.dataset_uri:
        required = DATASET_FILES[recipe.framework]
        problems.append(
            f"dataset_uri: empty; recipe {params.recipe!r} ({recipe.framework}) trains on a dataset prepared in its "
            f"format: give the S3 prefix that holds it{' (' + ', '.join(required) + ')' if required else ''}"
        )
    on_neuron = recipe is not None and recipe.framework == "neuronx-distributed"
    if recipe is not None and instance is not None and bool(instance.neuron_devices) != on_neuron:
        runs_on = "Trainium only" if on_neuron else "GPUs or CPUs, not Trainium"
        problems.append(
            f"instance_type: got {params.instance_type!r} ({instance.accelerator}); recipe {params.recipe!r} trains "
            f"with {recipe.framework}, which runs on {runs_on}"
        )
    if recipe is not None and instance is not None and instance.accelerator == "cpu" and not on_neuron:
        types = instance_types()
        sized_for = recipe.defaults.instance_type
        if types[sized_for].accelerator != "cpu":  # a model that would not fit or finish on CPU nodes
            cpus = [name for name, r in catalogue().items() if types[r.defaults.instance_type].accelerator == "cpu"]
            problems.append(
                f"instance_type: got {params.instance_type!r} (cpu); recipe {params.recipe!r} is sized for "
                f"{sized_for} ({types[sized_for].accelerator}) nodes and would not fit or finish on CPU nodes: give "
                f"an accelerator instance type, or a recipe for CPUs ({', '.join(cpus)})"
            )
    if recipe is not None and instance is not None:
        try:
            recipe.ranks(params.num_nodes, instance.accelerators_per_node)
        except RecipeError as err:
            problems.append(f"num_nodes: got {params.num_nodes}; {err}")
        fsx = run_fsx(params, recipe) if run_fsx else None
        hours = estimate_training_hours(params, recipe, fsx)
        pending = params.pending_timeout_minutes / 60
        if params.expiry_hours < hours + SETUP_HOURS + pending:
            problems.append(
                f"expiry_hours: got {params.expiry_hours}; the run is estimated to take {hours:.1f} h of training "
                f"plus up to {SETUP_HOURS:.0f} h for its cluster and results"
                + (f" plus up to {pending:.1f} h pending (pending_timeout_minutes)" if pending else "")
                + f": give at least {hours + SETUP_HOURS + pending:.1f}, or the reaper deletes the run while it runs"
            )
        cost = estimate_cost_usd(params, recipe, instance.price_usd_per_hour, fsx)
        if cost > params.budget_usd:
            paid = f"{params.num_nodes} x {params.instance_type}"
            if fsx:
                paid += f" and a {fsx.storage_gib} GiB FSx for Lustre at {fsx.throughput_per_tib} MB/s per TiB"
            problems.append(
                f"budget_usd: got {params.budget_usd}; the estimated cost is {cost:.2f} USD "
                f"({paid} for {params.max_steps} steps and up to {SETUP_HOURS:.0f} h of setup and teardown)"
            )
    if params.exclude_nodes and params.platform not in NODES_OUTLIVE_RUNS:
        why = (
            "does not schedule with Slurm, which reads it (cordon the node in Kubernetes, or take it out of the "
            "compute environment)"
            if params.platform in ("eks", "batch")
            else "creates a cluster for each run, whose node names no run knows beforehand (a node an earlier "
            "run's preflight found bad went with that run's cluster)"
        )
        problems.append(f"exclude_nodes: got {params.exclude_nodes!r}; platform {params.platform!r} {why}")
    if params.gang_scheduler != "none" and params.platform not in KUBERNETES_PLATFORMS:
        problems.append(
            f"gang_scheduler: got {params.gang_scheduler!r}; platform {params.platform!r} runs its jobs with "
            f"{'AWS Batch' if params.platform == 'batch' else 'Slurm'}, which starts a job's nodes together "
            f"anyway: a gang scheduler places the pods of PyTorchJobs (platforms {' and '.join(KUBERNETES_PLATFORMS)} "
            "on EKS); give none"
        )
    if problems:
        raise ParamsError.from_problems(*problems)
    return params


def validate_cluster_params(conf: dict[str, Any]) -> ValidateParams:
    """Validate a ``validate_cluster`` conf before any job is submitted."""
    params = parse_params(ValidateParams, conf)
    if params.instance_type not in instance_types():
        raise ParamsError.from_problems(
            f"instance_type: got {params.instance_type!r}; allowed: {', '.join(sorted(instance_types()))}"
        )
    return params
