"""Where profiled training steps spend their time, from a torch.profiler Chrome trace.

The trainer writes one trace per rank for the ``profile_steps`` window (``include/training/profiling.py``).
On a GPU the trace's kernels are the work; on a CPU it is the operators' own (exclusive) time, nested
operators counted once, and the communication threads' collectives. The summary groups that work by kind
(matmul, attention, communication, optimizer, memory, other) and sets it against the window's span: the
part of the span with nothing running is what the device waited (on the host, the data or a launch).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATEGORIES = {"cpu_op", "user_annotation"}
# First match wins, on the lower-cased event name.
KINDS: list[tuple[str, tuple[str, ...]]] = [
    (
        "communication",
        # "_reduce (": FSDP's post-backward reduce-scatter, "FSDP::post_backward_reduce (<module>)"
        ("nccl", "gloo:", "c10d", "all_gather", "allgather", "reduce_scatter", "all_reduce", "_reduce ("),
    ),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("optimizer", ("adam", "multi_tensor_apply", "aten::_foreach")),
    ("memory", ("memcpy", "memset", "aten::copy_", "aten::fill_", "aten::zero_")),
]


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lowered for mark in marks)), "other")


def _exclusive(events: list[dict[str, Any]]) -> list[tuple[dict[str, Any], float]]:
    """Each event with its own time: its duration less that of the events nested in it (one thread's)."""
    ordered = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    own = {id(e): float(e["dur"]) for e in ordered}
    stack: list[dict[str, Any]] = []
    for event in ordered:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= event["ts"]:
            stack.pop()
        if stack:
            own[id(stack[-1])] -= event["dur"]
        stack.append(event)
    return [(e, max(own[id(e)], 0.0)) for e in ordered]


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize_trace(trace: dict[str, Any], top: int = 8) -> dict[str, Any]:
    """The window's span, busy time and idle share, and its work by kind and by name (milliseconds)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    device = [e for e in events if e.get("cat") in DEVICE_CATEGORIES]
    if device:
        timed = [(e, float(e["dur"])) for e in device]
    else:
        threads: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
        for event in events:
            if event.get("cat") in HOST_CATEGORIES:
                threads[(event.get("pid"), event.get("tid"))].append(event)
        timed = [pair for thread in threads.values() for pair in _exclusive(thread)]
    if not timed:
        raise ValueError("the trace has no kernel or operator events")
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event, own_us in timed:
        by_kind[kind_of(event["name"])] += own_us
        by_name[event["name"]] += own_us
    kinds = sorted(by_kind.items(), key=lambda kv: -kv[1])
    work = sum(by_kind.values())
    span = max(e["ts"] + e["dur"] for e, _ in timed) - min(e["ts"] for e, _ in timed)
    busy = _union_us((e["ts"], e["ts"] + e["dur"]) for e, _ in timed)
    return {
        "source": "device kernels" if device else "host operators",
        "span_ms": round(span / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "idle_share": round(1 - busy / span, 4) if span else 0.0,
        "by_kind_ms": {k: round(v / 1e3, 3) for k, v in kinds},
        "by_kind_share": {k: round(v / work, 4) for k, v in kinds},
        "top_ms": {n: round(v / 1e3, 3) for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]},
    }
