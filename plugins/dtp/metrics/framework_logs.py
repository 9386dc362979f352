"""Step records from the logs of training frameworks DTP launches but does not write.

Each parser reads a job log and yields the records the FSDP trainer writes
itself (``{"event": "step", "step", "loss", "tokens_per_s", ...}``, tokens/s
for the whole job), so ``dtp.metrics.parse`` summarizes and the gates judge a
torchtitan, Megatron-LM, neuronx-distributed, picotron or NeMo run like any other. The
formats are those printed by:

- torchtitan (``torchtitan/components/metrics.py``): ``step: 10  loss:  7.1
  ...  memory: 9.46GiB(64.99%)  tps: 7,282  tflops: 0.52  mfu: 0.17%``, with
  ``tps`` per device;
- Megatron-LM (``megatron/training/training.py``, ``training_log``):
  ``iteration 10/ 500 | consumed samples: ... | elapsed time per iteration
  (ms): 2834.5 | ... | global batch size: 64 | lm loss: 1.04E+01 | ...``;
- neuronx-distributed's example trainers (their ``logger.py``):
  ``LOG <asctime> - (epoch, step) step_loss : 4.1 learning_rate : 1.5e-04
  throughput : 12.3``, with ``throughput`` in sequences/s for the job;
- picotron (``train.py``): ``[rank 0] Step: 10 | Loss: 7.1234 | Global batch
  size: 131.07K | Tokens/s: 402.65K | Tokens/s/GPU: 25.17K | Tokens: 1.31M |
  MFU: 32.10% | Memory usage: 41.20GB``, numbers with picotron's K/M/B/T
  suffixes, ``Tokens/s`` for the job and ``MFU`` against an H100's peak;
- NeMo 2.0 (its progress printer): ``Training epoch 0, iteration 9/99 | lr:
  1.5e-05 | global_batch_size: 128 | global_step: 9 | reduced_train_loss:
  6.265 | train_step_timing in s: 12.22 | consumed_samples: 1280``, with
  iterations counted from 0.

Log prefixes (``srun -l``'s ``0:``, torchrun's ``[rank0]:``) and terminal
colour codes are ignored. Only torchtitan logs when an attempt starts; in the
other frameworks' logs a step that does not exceed the one before marks one.

The parsers keep the MFU a framework prints, by its own accounting; the summary
of a framework's run takes every step's MFU by DTP's trainer's accounting
instead (``dtp.metrics.flops``), so that the frameworks' MFUs compare.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dtp.metrics.flops import model_flops_utilisation
from dtp.metrics.parse import TrainingSummary, json_records, summarize_records

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMBER = r"[-+]?[0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?"
# A loss is also "nan" or "inf" once training diverged: that line is what the divergence gate judges.
_LOSS = rf"(?:[-+]?(?i:nan|inf(?:inity)?)|{_NUMBER})"
_TORCHTITAN = re.compile(
    rf"(?<!validate )step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>{_LOSS}).*?"
    rf"(?:memory:\s*(?P<memory>{_NUMBER})GiB.*?)?tps:\s*(?P<tps>{_NUMBER})"
    rf"(?:.*?mfu:\s*(?P<mfu>{_NUMBER})%)?"
)
_TORCHTITAN_START = re.compile(r"Training starts at step (?P<step>\d+)")
_MEGATRON_ITERATION = re.compile(r"\biteration\s+(?P<step>\d+)\s*/")
_NEMO_ITERATION = re.compile(r"Training epoch \d+, iteration (?P<step>\d+)/\d+")
_NEURONX = re.compile(
    rf"LOG .* - \(\d+, (?P<step>\d+)\) step_loss : (?P<loss>{_LOSS}) .*?throughput : (?P<throughput>{_NUMBER})"
)

_PICOTRON = re.compile(
    rf"Step:\s*(?P<step>\d+)\s*\|\s*Loss:\s*(?P<loss>{_LOSS})\s*\|.*?\|\s*Tokens/s:\s*(?P<tps>[0-9.]+[KMBT]?)\s*\|"
    r".*?MFU:\s*(?P<mfu>[0-9.]+)%(?:.*?Memory usage:\s*(?P<memory>[0-9.]+)GB)?"
)
# picotron's to_readable_format suffixes.
_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}

Records = Iterator[dict[str, Any]]


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def torchtitan_records(lines: Iterable[str], *, world_size: int, **_: Any) -> Records:
    """torchtitan's metric lines; ``tps`` is per device, so the job's tokens/s is ``tps * world_size``.

    Every rank logs every step, and under pipeline parallelism only the last stage knows the loss (the others
    log -1): the ranks' lines of a step make one record, with the loss of the stage that has it and the largest
    memory. The ranks' ``Training starts at step`` banners open each attempt (the first, or one resumed from a
    checkpoint after a requeue), so the gates count the restarts and leave each attempt's first step out of the
    throughput. Validation lines (``validate step: ...``) are not training steps.
    """
    attempt: dict[int, dict[str, Any]] = {}
    opened_at: int | None = None  # the step the current attempt's banners name
    banners = 0  # the current attempt's: one a rank
    for line in lines:
        text = _ANSI.sub("", line)
        banner = _TORCHTITAN_START.search(text)
        if banner:
            # Another rank's banner of this attempt (over srun it may come after a first step line) names its step;
            # a relaunch before the first checkpoint names the same step, once every rank's banner was seen.
            if int(banner["step"]) != opened_at or banners >= world_size:
                yield from (attempt.pop(step) for step in sorted(attempt))
                yield {"event": "start"}
                opened_at, banners = int(banner["step"]), 0
            banners += 1
            continue
        match = _TORCHTITAN.search(text)
        if not match:
            continue
        step = int(match["step"])
        record: dict[str, Any] = {
            "event": "step",
            "step": step,
            "loss": _float(match["loss"]),
            "tokens_per_s": _float(match["tps"]) * world_size,
        }
        if match["memory"]:
            record["memory_mb"] = _float(match["memory"]) * 1024
        if match["mfu"]:
            record["mfu"] = _float(match["mfu"]) / 100
        _merge(attempt.setdefault(step, record), record)
    yield from (attempt[step] for step in sorted(attempt))


def _merge(record: dict[str, Any], other: dict[str, Any]) -> None:
    """Fold another rank's line of the same step into ``record``."""
    if record["loss"] < 0:  # a pipeline stage without the loss
        record["loss"] = other["loss"]
    if "memory_mb" in other:
        record["memory_mb"] = max(record.get("memory_mb", 0.0), other["memory_mb"])


def _fields(text: str) -> dict[str, str]:
    """``key: value | key: value`` pairs (a value's ``/ total`` left out)."""
    fields = {}
    for part in text.split("|"):
        key, sep, value = part.rpartition(":")
        if sep:
            fields[key.strip()] = value.strip().split("/")[0]
    return fields


def megatron_records(lines: Iterable[str], *, seq_len: int, **_: Any) -> Records:
    """Megatron-LM's ``training_log`` lines: tokens/s is global batch x sequence length / time per iteration."""
    for line in lines:
        match = _MEGATRON_ITERATION.search(line)
        if not match:
            continue
        fields = _fields(line[match.end() :])
        loss = fields.get("lm loss")
        if loss is None or "elapsed time per iteration (ms)" not in fields:  # e.g. a skipped iteration
            continue
        seconds = _float(fields["elapsed time per iteration (ms)"]) / 1000
        yield {
            "event": "step",
            "step": int(match["step"]),
            "loss": _float(loss),
            "tokens_per_s": _float(fields["global batch size"]) * seq_len / seconds,
        }


def nemo_records(lines: Iterable[str], *, seq_len: int, **_: Any) -> Records:
    """NeMo's progress lines: tokens/s is global batch x sequence length / step time; step = iteration + 1."""
    for line in lines:
        match = _NEMO_ITERATION.search(line)
        if not match:
            continue
        fields = _fields(line[match.end() :])
        if "reduced_train_loss" not in fields or "train_step_timing in s" not in fields:
            continue
        yield {
            "event": "step",
            "step": int(match["step"]) + 1,
            "loss": _float(fields["reduced_train_loss"]),
            "tokens_per_s": _float(fields["global_batch_size"]) * seq_len / _float(fields["train_step_timing in s"]),
        }


def neuronx_records(lines: Iterable[str], *, seq_len: int, **_: Any) -> Records:
    """neuronx-distributed's ``LOG`` lines: ``throughput`` is sequences/s for the job."""
    for line in lines:
        match = _NEURONX.search(line)
        if match:
            yield {
                "event": "step",
                "step": int(match["step"]),
                "loss": _float(match["loss"]),
                "tokens_per_s": _float(match["throughput"]) * seq_len,
            }


def picotron_records(lines: Iterable[str], **_: Any) -> Records:
    """picotron's step lines: ``Tokens/s`` is for the job; memory is reserved GB (10^9 bytes). Its MFU (get_mfu in
    picotron/utils.py) counts 6 x every parameter, the token embedding's too, against an H100's peak whatever the
    GPU."""
    for line in lines:
        match = _PICOTRON.search(line)
        if match:
            tps = match["tps"]
            suffix = tps[-1] if tps[-1] in _SUFFIXES else ""
            record = {
                "event": "step",
                "step": int(match["step"]),
                "loss": float(match["loss"]),
                "tokens_per_s": float(tps.removesuffix(suffix)) * _SUFFIXES[suffix],
            }
            record["mfu"] = float(match["mfu"]) / 100
            if match["memory"]:
                record["memory_mb"] = float(match["memory"]) * 1e9 / 2**20
            yield record


def _trainer_records(lines: Iterable[str], **_: Any) -> Records:
    return iter(json_records(lines))


def _starts_where_steps_go_back(records: Records) -> Records:
    """``records`` with a start before the first step and before each step that does not exceed the one before it,
    so that the summary counts the restarts and leaves each attempt's first window out of the throughput, as the
    trainer's own start records have it. A requeued job appends to the same log (``tee -a``) and goes on from its
    last checkpoint, at or before the last step it logged; one that died before it logged past that checkpoint
    cannot be told from the first attempt going on."""
    last: int | None = None
    for record in records:
        if record["event"] == "step":
            if last is None or record["step"] <= last:
                yield {"event": "start"}
            last = record["step"]
        yield record


PARSERS: dict[str, Callable[..., Records]] = {
    "fsdp": _trainer_records,
    "torchtitan": torchtitan_records,
    "megatron-lm": megatron_records,
    "neuronx-distributed": neuronx_records,
    "picotron": picotron_records,
    "nemo": nemo_records,
}


# Frameworks whose records mark each attempt's start themselves.
LOGS_STARTS = frozenset({"fsdp", "torchtitan"})


def _with_dtp_mfu(
    records: Records, *, model: str | None, seq_len: int, world_size: int, peak_flops: float | None
) -> Records:
    """``records`` with each step's MFU by DTP's trainer's accounting in place of the framework's own; with none
    where the model or the peak is not known."""
    for record in records:
        if record["event"] == "step":
            record.pop("mfu", None)
            if model is not None and peak_flops:
                record["mfu"] = model_flops_utilisation(
                    model,
                    seq_len,
                    tokens_per_s=record["tokens_per_s"],
                    world_size=world_size,
                    peak_flops=peak_flops,
                )
        yield record


def summarize_log(
    framework: str,
    lines: Iterable[str],
    *,
    seq_len: int,
    world_size: int,
    model: str | None = None,
    peak_flops: float | None = None,
) -> TrainingSummary:
    """The run summary of a ``framework`` job log (or, for DTP's own trainer, its metrics file). A framework's run
    gets its MFU by DTP's trainer's accounting from the recipe's ``model`` and the instance type's ``peak_flops``
    per accelerator (None: not known, and the run has no MFU); the trainer's metrics file keeps its own."""
    try:
        parser = PARSERS[framework]
    except KeyError:
        raise ValueError(f"no log parser for framework {framework!r}; known: {', '.join(PARSERS)}") from None
    records = parser(lines, seq_len=seq_len, world_size=world_size)
    if framework != "fsdp":
        records = _with_dtp_mfu(records, model=model, seq_len=seq_len, world_size=world_size, peak_flops=peak_flops)
    return summarize_records(records if framework in LOGS_STARTS else _starts_where_steps_go_back(records))
