"""Parse the trainer's JSON lines into a run summary.

Lines that are not JSON (torchrun banners, Slurm messages, ``srun -l``
prefixes) are skipped, so the same parser reads a metrics file or a raw job log.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class TrainingSummary:
    """What a training log says: each logged step's loss and throughput, the checkpoints, restarts and the run's
    size; the report, the gates and the metrics history read it."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    # Steps whose window began with a (re)start: the allocator's and compiled code's warm-up is in them.
    warm_up_steps: list[int] = field(default_factory=list)
    restarts: int = 0
    params: int | None = None
    world_size: int | None = None
    max_memory_mb: float | None = None
    mfu: float | None = None  # the median over the windows median_tokens_per_s takes
    finished: bool = False
    # The first step whose loss or gradient norm was not finite, unless a later finite step got past it: its numbers
    # are left out of the ones above, so the summary stays JSON (an XCom, a history entry) and the gates judge the
    # divergence itself.
    diverged_at: int | None = None

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    @property
    def median_tokens_per_s(self) -> float | None:
        window = self.steady(self.tokens_per_s)
        return statistics.median(window) if window else None

    def steady(self, values: list[T]) -> list[T]:
        """``values`` (one per logged step) of the windows without a warm-up, or all when every one has one."""
        warm_up = set(self.warm_up_steps)
        return [value for step, value in zip(self.steps, values, strict=True) if step not in warm_up] or values

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            first_loss=self.first_loss,
            final_loss=self.final_loss,
            median_tokens_per_s=self.median_tokens_per_s,
            last_step=self.steps[-1] if self.steps else 0,
        )
        return data


def json_records(lines: Iterable[str]) -> Iterable[dict[str, Any]]:
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "event" in record:
            yield record


def summarize(lines: Iterable[str]) -> TrainingSummary:
    """The summary of the trainer's JSON lines (see ``summarize_records``)."""
    return summarize_records(json_records(lines))


def summarize_records(records: Iterable[dict[str, Any]]) -> TrainingSummary:
    """Fold the records into a summary; a step logged twice (after a resume) keeps its latest value."""
    by_step: dict[int, dict[str, Any]] = {}
    warm_up: set[int] = set()
    summary = TrainingSummary()
    starts = 0
    started = True  # the records' first window is a warm-up, whether or not its start record is among them
    for record in records:
        event = record["event"]
        if event == "start":
            starts += 1
            started = True
            summary.params = record.get("params")
            summary.world_size = record.get("world_size")
        elif event == "diverged" or (event == "step" and not math.isfinite(float(record["loss"]))):
            step = int(record["step"])
            if summary.diverged_at is None or step < summary.diverged_at:
                summary.diverged_at = step
        elif event == "step":
            step = int(record["step"])
            if summary.diverged_at is not None and step >= summary.diverged_at:
                summary.diverged_at = None  # a relaunch from a checkpoint got past it: a fault, not a divergence
            by_step[step] = record
            if started:
                warm_up.add(step)
            else:
                warm_up.discard(step)
            started = False
        elif event == "checkpoint":
            summary.checkpoints.append(int(record["step"]))
        elif event == "end":
            summary.finished = True
    summary.restarts = max(0, starts - 1)
    mfus = []
    for step in sorted(by_step):
        record = by_step[step]
        summary.steps.append(step)
        summary.losses.append(float(record["loss"]))
        summary.tokens_per_s.append(float(record["tokens_per_s"]))
        if step in warm_up:
            summary.warm_up_steps.append(step)
        if record.get("memory_mb") is not None:
            summary.max_memory_mb = max(summary.max_memory_mb or 0.0, float(record["memory_mb"]))
        mfus.append(float(record["mfu"]) if record.get("mfu") is not None else None)
    steady_mfus = [mfu for mfu in summary.steady(mfus) if mfu is not None]
    summary.mfu = statistics.median(steady_mfus) if steady_mfus else None
    return summary
