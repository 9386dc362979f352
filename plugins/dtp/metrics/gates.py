"""Pass/fail gates: each failure names the metric, the measured value and the bound."""

from __future__ import annotations

import hashlib
import json
import statistics
from typing import Any

from dtp.metrics.parse import TrainingSummary
from dtp.recipes import instance_types

# What a past run must share with this one for their numbers to compare, each with the value an entry recorded
# before it was kept stands for. A profiled run is slower; another dataset has other losses; another recipe content
# (micro_batch, lr, precision, parallelism...), image or AMI, nodes of a capacity fallback's instance type, or other
# extra_env (NCCL's and EFA's settings among them), trains otherwise. An entry recorded before the last four were
# kept compares only with a run that lacks them too (none since they are recorded): the regression gates start a
# new baseline instead of judging against runs whose recipe, image and environment nobody knows, which could fail
# every later run for good (failed runs never join the baseline).
COMPARED_PARAMS: dict[str, Any] = {
    "num_nodes": None,
    "max_steps": None,
    "dataset_uri": "",
    "profile_steps": 0,
    "recipe_digest": None,
    "runtime": None,
    "actual_instance_type": None,
    "extra_env_digest": None,
}
# Recipe fields that do not change how a run trains: judging (gates), the form's defaults, when it runs, its name
# (the history is kept per recipe name), its prose and its cost estimate.
NOT_TRAINING_FIELDS = frozenset({"name", "description", "gates", "defaults", "schedule", "expected_step_seconds"})


def recipe_digest(recipe: dict[str, Any]) -> str:
    """A short digest of what the recipe trains (model, precision, seq_len, micro_batch, lr, parallelism...):
    runs whose recipe file changed in any of these are not compared with the earlier ones."""
    content = {k: v for k, v in recipe.items() if k not in NOT_TRAINING_FIELDS}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]


def extra_env_digest(extra_env: dict[str, str]) -> str:
    """A short digest of the run's ``extra_env``, names and values: runs with other variables are not compared. The
    values themselves (they may hold tokens) are never recorded."""
    return hashlib.sha256(json.dumps(extra_env, sort_keys=True).encode()).hexdigest()[:12]


def runtime_of(images: dict[str, Any] | None) -> str | None:
    """The training runtime a run used, from ``resolve_images``' result: its image (else what the platform runs
    without one, e.g. "project virtualenv"), and the AMI its nodes booted where one was published."""
    if not images:
        return None
    image = images.get("image") or images.get("source")
    ami = images.get("ami")
    return f"{image} on {ami}" if image and ami else image or ami


def same_as(current: dict[str, Any]) -> str:
    """What the runs ``current`` is compared with share, besides recipe name and platform: for messages."""
    return ", ".join(f"{k}={current.get(k, d)!r}" for k, d in COMPARED_PARAMS.items())


def throughput_scale(recipe: dict[str, Any], instance_type: str, num_nodes: int) -> float:
    """How many times the peak FLOP/s of the run's ``num_nodes`` nodes of ``instance_type`` is that of the nodes the
    recipe's ``min_tokens_per_s`` is set for (its default instance type and node count): the tokens/s a healthy run
    reaches grows with it. 1 where either peak is not known (CPU nodes)."""
    defaults, types = recipe["defaults"], instance_types()
    run, expected = types[instance_type], types[defaults["instance_type"]]
    if run.peak_flops is None or expected.peak_flops is None:
        return 1.0
    run_peak = run.peak_flops * run.accelerators_per_node * num_nodes
    return run_peak / (expected.peak_flops * expected.accelerators_per_node * defaults["num_nodes"])


def training_failures(
    summary: TrainingSummary, gates: dict[str, Any], max_steps: int, *, scale: float = 1.0
) -> list[str]:
    """The recipe's absolute gates the run failed; ``min_tokens_per_s`` is taken ``scale`` times (what
    ``throughput_scale`` gives for the run's nodes)."""
    failures = []
    if summary.diverged_at is not None:
        failures.append(f"loss: not finite from step {summary.diverged_at} (training diverged), whatever the gates")
    if not summary.steps:
        return [*failures, "no training step was logged"]
    if summary.steps[-1] < max_steps:
        failures.append(f"steps: reached {summary.steps[-1]}, expected {max_steps}")
    final, first = summary.final_loss, summary.first_loss
    if gates.get("final_loss_max") is not None and final is not None and final > gates["final_loss_max"]:
        failures.append(f"final_loss: {final:.4f} > allowed {gates['final_loss_max']}")
    if gates.get("loss_must_decrease") and final is not None and first is not None and not final < first:
        failures.append(f"loss did not decrease: first {first:.4f}, final {final:.4f}")
    tps, required = summary.median_tokens_per_s, gates.get("min_tokens_per_s")
    if required is not None and tps is not None and tps < required * scale:
        bound = (
            f"{required}"
            if scale == 1
            else f"{required * scale:.0f} ({required} x {scale:.3g}, these nodes' peak FLOP/s "
            "over those of the recipe's default instance type and nodes)"
        )
        failures.append(f"tokens_per_s: median {tps:.0f} < required {bound}")
    return failures


def comparable(current: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a history entry trained like ``current`` (same nodes, steps, data, profiling, recipe content,
    runtime and instance type actually used): only then do their numbers compare. An entry recorded before a
    parameter was kept counts as having its default."""
    return all(entry.get(k, d) == current.get(k, d) for k, d in COMPARED_PARAMS.items())


def comparable_runs(current: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries trained like ``current``."""
    return [h for h in history if comparable(current, h)]


def regression_failures(current: dict[str, Any], history: list[dict[str, Any]], gates: dict[str, Any]) -> list[str]:
    """Regressions against the median of recent comparable runs that passed their gates (skipped until there are
    enough of them), so a lasting regression never becomes its own baseline; each names what the runs it was
    compared with share, so that a changed recipe or image is seen to start a new baseline."""
    passed = [h for h in comparable_runs(current, history) if h.get("passed", True)]
    comparable = passed[-gates["history_runs"] :]
    if len(comparable) < gates["min_history_runs"]:
        return []
    failures = []
    loss_median = statistics.median(h["final_loss"] for h in comparable)
    # No final loss: the run diverged before its first finite step, which training_failures reports.
    if current["final_loss"] is not None and current["final_loss"] > loss_median * (1 + gates["max_loss_regression"]):
        failures.append(
            f"final_loss regressed: {current['final_loss']:.4f} vs median {loss_median:.4f} of the last "
            f"{len(comparable)} runs (+{current['final_loss'] / loss_median - 1:.1%}, "
            f"allowed +{gates['max_loss_regression']:.0%}); compared with runs of {same_as(current)}"
        )
    tps = [h["median_tokens_per_s"] for h in comparable if h.get("median_tokens_per_s")]
    if tps and current.get("median_tokens_per_s"):
        tps_median = statistics.median(tps)
        if current["median_tokens_per_s"] < tps_median * (1 - gates["max_throughput_regression"]):
            failures.append(
                f"tokens_per_s regressed: {current['median_tokens_per_s']:.0f} vs median {tps_median:.0f} of the last "
                f"{len(tps)} runs ({current['median_tokens_per_s'] / tps_median - 1:.1%}, "
                f"allowed -{gates['max_throughput_regression']:.0%}); compared with runs of {same_as(current)}"
            )
    return failures
