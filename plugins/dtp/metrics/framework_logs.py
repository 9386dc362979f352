"""Step records from the logs of training frameworks DTP launches but does not write.

Each parser reads a job log and yields the records the FSDP trainer writes
itself (``{"event": "step", "step", "loss", "tokens_per_s", ...}``, tokens/s
for the whole job), so ``dtp.metrics.parse`` summarizes and the gates judge a
torchtitan, Megatron-LM or neuronx-distributed run like any other. The
formats are those printed by:

- torchtitan (``torchtitan/components/metrics.py``): ``step: 10  loss:  7.1
  ...  memory: 9.46GiB(64.99%)  tps: 7,282  tflops: 0.52  mfu: 0.17%``, with
  ``tps`` per device;
- Megatron-LM (``megatron/training/training.py``, ``training_log``):
  ``iteration 10/ 500 | consumed samples: ... | elapsed time per iteration
  (ms): 2834.5 | ... | global batch size: 64 | lm loss: 1.04E+01 | ...``;
- neuronx-distributed's example trainers (their ``logger.py``):
  ``LOG <asctime> - (epoch, step) step_loss : 4.1 learning_rate : 1.5e-04
  throughput : 12.3``, with ``throughput`` in sequences/s for the job.

Log prefixes (``srun -l``'s ``0:``, torchrun's ``[rank0]:``) and terminal
colour codes are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dtp.metrics.parse import TrainingSummary, json_records, summarize_records

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUMBER = r"[-+]?[0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?"
_TORCHTITAN = re.compile(
    rf"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>{_NUMBER}).*?"
    rf"(?:memory:\s*(?P<memory>{_NUMBER})GiB.*?)?tps:\s*(?P<tps>{_NUMBER})"
    rf"(?:.*?mfu:\s*(?P<mfu>{_NUMBER})%)?"
)
_MEGATRON_ITERATION = re.compile(r"\biteration\s+(?P<step>\d+)\s*/")
_NEURONX = re.compile(
    rf"LOG .* - \(\d+, (?P<step>\d+)\) step_loss : (?P<loss>{_NUMBER}) .*?throughput : (?P<throughput>{_NUMBER})"
)

Records = Iterator[dict[str, Any]]


def _float(text: str) -> float:
    return float(text.replace(",", ""))


def torchtitan_records(lines: Iterable[str], *, world_size: int, **_: Any) -> Records:
    """torchtitan's metric lines; ``tps`` is per device, so the job's tokens/s is ``tps * world_size``."""
    for line in lines:
        match = _TORCHTITAN.search(_ANSI.sub("", line))
        if match:
            record = {
                "event": "step",
                "step": int(match["step"]),
                "loss": _float(match["loss"]),
                "tokens_per_s": _float(match["tps"]) * world_size,
            }
            if match["memory"]:
                record["memory_mb"] = _float(match["memory"]) * 1024
            if match["mfu"]:
                record["mfu"] = _float(match["mfu"]) / 100
            yield record


def megatron_records(lines: Iterable[str], *, seq_len: int, **_: Any) -> Records:
    """Megatron-LM's ``training_log`` lines: tokens/s is global batch x sequence length / time per iteration."""
    for line in lines:
        match = _MEGATRON_ITERATION.search(line)
        if not match:
            continue
        fields = {}
        for part in line[match.end() :].split("|"):
            key, sep, value = part.rpartition(":")
            if sep:
                fields[key.strip()] = value.strip().split("/")[0]
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


def _trainer_records(lines: Iterable[str], **_: Any) -> Records:
    return iter(json_records(lines))


PARSERS: dict[str, Callable[..., Records]] = {
    "fsdp": _trainer_records,
    "torchtitan": torchtitan_records,
    "megatron-lm": megatron_records,
    "neuronx-distributed": neuronx_records,
}


def summarize_log(framework: str, lines: Iterable[str], *, seq_len: int, world_size: int) -> TrainingSummary:
    """The run summary of a ``framework`` job log (or, for DTP's own trainer, its metrics file)."""
    try:
        parser = PARSERS[framework]
    except KeyError:
        raise ValueError(f"no log parser for framework {framework!r}; known: {', '.join(PARSERS)}") from None
    return summarize_records(parser(lines, seq_len=seq_len, world_size=world_size))
