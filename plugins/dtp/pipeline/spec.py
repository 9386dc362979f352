"""The run spec: validated params, recipe, names and tags, fixed once by validate_params.

Every later task takes the spec from XCom, so no task re-reads params or
re-derives names, and a retried task sees exactly what the first try saw.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from dtp.costs import (
    MODEL_PARAMETERS,
    RunFsx,
    checkpoint_bytes,
    checkpoint_footprint_bytes,
    checkpoint_saves,
    checkpoints_on_disk,
    estimate_cost_usd,
    fsx_storage_gib_for,
    training_time_limit_minutes,
)
from dtp.form_params import ParamsError
from dtp.hostlist import expand_hostlist
from dtp.naming import RunNames, expiry, resource_tags
from dtp.params import NODES_OUTLIVE_RUNS, TrainParams, validate_params
from dtp.pipeline.data import SAMPLE_CORPUS
from dtp.pipeline.frameworks import NEEDS_ASSETS
from dtp.pipeline.network import NETWORK_CONN_ID, existing_network, needs_network
from dtp.platforms import get_platform
from dtp.platforms.base import ComputePlatform
from dtp.platforms.local import LocalSlurmPlatform
from dtp.recipes import Recipe, get_recipe, instance_types

log = logging.getLogger(__name__)

# How many earlier incarnations of a run its teardowns delete, the first and the latest (each costs a few describe
# calls when it made nothing, as most do: Airflow counts every clear of a task of the run).
RETIRED_INCARNATIONS = 5
# Run ids of the runs scripts/backfill triggers for a DAG without a schedule: the prefix, the command's start time,
# the date.
TRIGGERED_RUN_PREFIX = "backfill_triggered__"


def build_spec(params: Mapping[str, Any], conf: Mapping[str, Any], names: RunNames) -> dict[str, Any]:
    """Validate ``params`` (form defaults + conf) plus any key of ``conf`` no param declares; the spec of the run
    whose resources ``names`` names."""
    merged = {**dict(params), **dict(conf)}
    validated = validate_params(merged, run_fsx)
    platform = get_platform(validated.platform)
    recipe = get_recipe(validated.recipe)
    framework = recipe.framework
    if platform.scheduler != "slurm" and framework != "fsdp":
        raise ParamsError.from_problems(
            f"recipe: got {validated.recipe!r}, which trains with {framework}; on "
            f"{validated.platform} DTP runs its own FSDP trainer only (the other frameworks launch from Slurm batch "
            "scripts): choose an fsdp recipe or a Slurm platform"
        )
    if validated.gang_scheduler != "none" and platform.scheduler != "kubernetes":
        # validate_params refused the platforms that never schedule with Kubernetes; HyperPod does by its connection.
        raise ParamsError.from_problems(
            f"gang_scheduler: got {validated.gang_scheduler!r}; platform {validated.platform!r} schedules with "
            f"{platform.scheduler}, which starts a job's nodes together anyway; give none"
        )
    if (
        framework in NEEDS_ASSETS
        and validated.platform not in NODES_OUTLIVE_RUNS
        and not platform.existing_file_system()
    ):
        raise ParamsError.from_problems(
            f"recipe: got {validated.recipe!r}, which trains with {framework} from the "
            f"model's files in <shared>/assets/{recipe.model}/, placed there beforehand; platform "
            f"{validated.platform!r} makes the run's file system with its cluster: give dtp_{validated.platform} an "
            "existing FSx for Lustre that holds them (see the README's Recipes and frameworks)"
        )
    excluded = set(expand_hostlist(validated.exclude_nodes))  # "n1,n[1-2]" excludes two nodes, not three
    # The one platform whose nodes outlive runs (params refuses exclude_nodes elsewhere): names it does not have.
    if excluded and isinstance(platform, LocalSlurmPlatform):
        nodes = platform.node_names()
        if unknown := excluded - set(nodes):
            raise ParamsError.from_problems(
                f"exclude_nodes: got {validated.exclude_nodes!r}; the cluster has no node "
                f"{', '.join(sorted(unknown))} (its nodes: {', '.join(nodes)})"
            )
    capacity = platform.max_nodes() - len(excluded)
    if validated.num_nodes > capacity:
        raise ParamsError.from_problems(
            f"num_nodes: got {validated.num_nodes}; platform {validated.platform!r} "
            f"has at most {capacity} nodes" + (f" once {len(excluded)} are excluded" if excluded else "")
        )
    if problem := checkpoint_space_problem(validated, recipe, platform):
        raise ParamsError.from_problems(problem)
    if problem := sample_corpus_problem(validated, recipe):
        raise ParamsError.from_problems(problem)
    fsx = run_fsx(validated, recipe)
    spec = run_spec(validated, names.dag_id, names.run_id, names.incarnation, names.installation, fsx)
    spec["existing_network"] = existing_network()
    if needs_network(spec) and not spec["existing_network"] and (file_system := platform.existing_file_system()):
        raise ParamsError.from_problems(
            f"platform: got {validated.platform!r}, whose nodes mount {file_system}, which "
            "outlives runs and is reachable only from its own VPC, while each run makes a VPC of its own: define "
            f"the {NETWORK_CONN_ID!r} connection with that VPC's subnets and security group (see the README's "
            "Going to a real AWS account)"
        )
    # The platform's requests, checked against its service's schema as provision will, before the network exists.
    if problems := platform.check(platform.render(spec, network_stand_in(spec))):
        raise ParamsError.from_problems(f"platform: {validated.platform!r} would be refused its cluster:", *problems)
    return spec


def shared_file_system_gib(platform: ComputePlatform) -> int | None:
    """The size of the shared file system the run's checkpoints go to, where DTP makes it with the cluster at a size
    its settings fix: ParallelCluster's FSx for Lustre with a ``fsx_storage_capacity_gib``. None elsewhere: one
    sized to the run, an existing file system, HyperPod's, EKS's, Batch's, the local one."""
    if platform.name != "parallelcluster" or platform.existing_file_system():
        return None
    from dtp.platforms.parallelcluster import ParallelClusterPlatform  # the run's platform: imported already

    return platform.settings.fsx_storage_capacity_gib if isinstance(platform, ParallelClusterPlatform) else None


def run_fsx(validated: TrainParams, recipe: Recipe) -> RunFsx | None:
    """The FSx for Lustre DTP makes for the run with its cluster, which the run pays for: ParallelCluster's, of the
    size ``ParallelClusterPlatform.fsx_storage_capacity_gib`` gives. None elsewhere, and where the nodes mount an
    existing file system (``fsx_file_system_id``)."""
    platform = get_platform(validated.platform)
    if platform.name != "parallelcluster" or platform.existing_file_system():
        return None
    from dtp.platforms.parallelcluster import ParallelClusterPlatform  # the run's platform: imported already

    if not isinstance(platform, ParallelClusterPlatform):
        return None
    spec = {"params": validated.model_dump(), "recipe": recipe.model_dump()}
    return RunFsx(platform.fsx_storage_capacity_gib(spec), platform.settings.fsx_throughput_per_tib)


def checkpoint_space_problem(validated: TrainParams, recipe: Recipe, platform: ComputePlatform) -> str | None:
    """Why the run's checkpoints would not fit on its shared file system (``dtp.costs.checkpoint_footprint_bytes``
    against ``shared_file_system_gib``), with what would fit; None when they fit or its size is not known."""
    capacity_gib = shared_file_system_gib(platform)
    if capacity_gib is None:
        return None
    capacity = capacity_gib * 2**30
    needed = checkpoint_footprint_bytes(validated, recipe)
    if needed <= capacity:
        return None
    one = checkpoint_bytes(recipe)
    what = (
        f"recipe {validated.recipe!r} ({recipe.framework}) saves {checkpoint_saves(validated)} checkpoints of "
        f"{one / 1e9:.0f} GB ({MODEL_PARAMETERS[recipe.model] / 1e9:.1f}B parameters and their optimizer state), up "
        f"to {checkpoints_on_disk(validated, recipe)} at once on the shared file system: {needed / 2**30:.0f} GiB, "
        f"more than the {capacity_gib} GiB FSx for Lustre dtp_{platform.name} makes for the run"
    )
    larger = (
        f"give dtp_{platform.name} an fsx_storage_capacity_gib of {fsx_storage_gib_for(needed)} or more (or none, "
        "to size it to each run), or an existing FSx for Lustre that has the room (fsx_file_system_id)"
    )
    if (fitting := capacity // one) == 0:
        return f"recipe: got {validated.recipe!r}; {what}: {larger}"
    fewer = math.ceil(validated.max_steps / fitting)  # at most `fitting` saves
    return (
        f"checkpoint_interval: got {validated.checkpoint_interval}; {what}: give a checkpoint_interval of {fewer} or "
        f"more, or {larger}"
    )


def sample_corpus_problem(validated: TrainParams, recipe: Recipe) -> str | None:
    """Why DTP's trainer cannot train the run on the sample corpus it stages when ``dataset_uri`` is empty: a step
    takes more samples than the corpus has windows of ``seq_len`` + 1 bytes, and no two ranks of a step may share a
    window (include/training/train.py ``batch_for``); None for a run of another dataset or framework, or one that
    fits."""
    if validated.dataset_uri or recipe.framework != "fsdp":
        return None
    windows = (SAMPLE_CORPUS.stat().st_size - 1) // recipe.seq_len
    accelerators = instance_types()[validated.instance_type].accelerators_per_node
    samples = recipe.tokens_per_step(validated.num_nodes, accelerators) // recipe.seq_len
    if samples <= windows:
        return None
    return (
        f"dataset_uri: empty, so recipe {validated.recipe!r} would train on DTP's sample corpus, {windows} windows of "
        f"{recipe.seq_len} + 1 bytes, while a step on {validated.num_nodes} x {validated.instance_type} takes "
        f"{samples} and no two ranks of a step may share one: give a dataset_uri"
    )


def network_stand_in(spec: dict[str, Any]) -> dict[str, str]:
    """Outputs of the kind the run's network stack will have (it does not exist yet), to render its requests."""
    return {
        "VPC": "vpc-00000000000000000",
        "PublicSubnet": "subnet-00000000000000000",
        "PrivateSubnet": "subnet-00000000000000001",
        "SecurityGroup": "sg-00000000000000000",
        "FSXSecurityGroup": "sg-00000000000000001",
        "DataBucket": spec["names"]["data_bucket"],
        **spec["existing_network"],
    }


def run_spec(
    validated: TrainParams,
    dag_id: str,
    run_id: str,
    incarnation: int = 0,
    installation: str = "",
    fsx: RunFsx | None = None,
) -> dict[str, Any]:
    """The spec of validated params: recipe, instance, names, tags, cost with ``fsx``, the FSx for Lustre DTP makes
    for the run (``run_fsx``), if any (no check against the platform)."""
    recipe = get_recipe(validated.recipe)
    instance = instance_types()[validated.instance_type]
    names = RunNames(dag_id, run_id, incarnation, installation)
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),  # a job of the run is submitted after it
        "params": validated.model_dump(),
        "recipe": recipe.model_dump(),
        "instance": instance.model_dump(),
        "names": names.as_dict(),
        # The teardowns delete these too: a run cleared whole while it ran never tore them down.
        "earlier_names": [earlier.as_dict() for earlier in names.earlier(RETIRED_INCARNATIONS)],
        "tags": resource_tags(names, validated.recipe, expiry(validated.expiry_hours)),
        # The FSx for Lustre made for the run, which its estimates count: priced_for prices it again.
        "fsx": asdict(fsx) if fsx else None,
        "estimated_cost_usd": estimate_cost_usd(validated, recipe, instance.price_usd_per_hour, fsx),
        "training_time_limit_minutes": training_time_limit_minutes(
            validated.budget_usd,
            validated.num_nodes,
            instance.price_usd_per_hour,
            validated.expiry_hours,
            validated.pending_timeout_minutes,
            fsx,
        ),
    }


def tear_down_earlier_incarnations(
    spec: dict[str, Any], teardown: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """``teardown`` of each earlier incarnation of the run (``earlier_incarnations``), by its run key: a run cleared
    whole while it ran got new names, and what its earlier incarnation made was never torn down."""
    retired = {}
    for earlier in earlier_incarnations(spec):
        run_key = earlier["names"]["run_key"]
        log.info("Deleting what incarnation %s of the run left (cleared whole while it ran)", run_key)
        retired[run_key] = teardown(earlier)
    return retired


def earlier_incarnations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec with the names each earlier incarnation of the run had (none for a spec from before they were
    recorded)."""
    return [{**spec, "names": names} for names in spec.get("earlier_names", [])]


def is_backfill(spec: dict[str, Any]) -> bool:
    """Whether the run fills in a past date: a run of an Airflow backfill, or one scripts/backfill triggered for a
    DAG without a schedule (which Airflow refuses to backfill), with that date as its logical date."""
    return spec.get("run_type") == "backfill" or spec["run_id"].startswith(TRIGGERED_RUN_PREFIX)
