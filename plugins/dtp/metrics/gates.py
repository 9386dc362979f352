"""Pass/fail gates: each failure names the metric, the measured value and the bound."""

from __future__ import annotations

import statistics
from typing import Any

from dtp.metrics.parse import TrainingSummary

# The run parameters a past run must share with this one for their numbers to compare, each with the value an
# entry recorded before it was kept stands for. A profiled run is slower; another dataset has other losses.
COMPARED_PARAMS: dict[str, Any] = {"num_nodes": None, "max_steps": None, "dataset_uri": "", "profile_steps": 0}


def training_failures(summary: TrainingSummary, gates: dict[str, Any], max_steps: int) -> list[str]:
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
    tps = summary.median_tokens_per_s
    if gates.get("min_tokens_per_s") is not None and tps is not None and tps < gates["min_tokens_per_s"]:
        failures.append(f"tokens_per_s: median {tps:.0f} < required {gates['min_tokens_per_s']}")
    return failures


def comparable(current: dict[str, Any], entry: dict[str, Any]) -> bool:
    """Whether a history entry trained like ``current`` (same nodes, steps, data and profiling): only then do their
    numbers compare. An entry recorded before a parameter was kept counts as having its default."""
    return all(entry.get(k, d) == current.get(k, d) for k, d in COMPARED_PARAMS.items())


def comparable_runs(current: dict[str, Any], history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History entries trained like ``current``."""
    return [h for h in history if comparable(current, h)]


def regression_failures(current: dict[str, Any], history: list[dict[str, Any]], gates: dict[str, Any]) -> list[str]:
    """Regressions against the median of recent comparable runs that passed their gates (skipped until there are
    enough of them), so a lasting regression never becomes its own baseline."""
    passed = [h for h in comparable_runs(current, history) if h.get("passed", True)]
    comparable = passed[-gates["history_runs"] :]
    if len(comparable) < gates["min_history_runs"]:
        return []
    failures = []
    loss_median = statistics.median(h["final_loss"] for h in comparable)
    if current["final_loss"] > loss_median * (1 + gates["max_loss_regression"]):
        failures.append(
            f"final_loss regressed: {current['final_loss']:.4f} vs median {loss_median:.4f} of the last "
            f"{len(comparable)} runs (+{current['final_loss'] / loss_median - 1:.1%}, "
            f"allowed +{gates['max_loss_regression']:.0%})"
        )
    tps = [h["median_tokens_per_s"] for h in comparable if h.get("median_tokens_per_s")]
    if tps and current.get("median_tokens_per_s"):
        tps_median = statistics.median(tps)
        if current["median_tokens_per_s"] < tps_median * (1 - gates["max_throughput_regression"]):
            failures.append(
                f"tokens_per_s regressed: {current['median_tokens_per_s']:.0f} vs median {tps_median:.0f} of the last "
                f"{len(tps)} runs ({current['median_tokens_per_s'] / tps_median - 1:.1%}, "
                f"allowed -{gates['max_throughput_regression']:.0%})"
            )
    return failures
