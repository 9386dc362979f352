"""A run's HTML report: params, resources, gates, and plots as embedded PNGs.

The PNGs are embedded as data URIs so the report is one self-contained object
that opens the same from S3, a presigned URL or a local file.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from dtp.metrics.parse import TrainingSummary


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plots(
    summary: TrainingSummary,
    preflight: dict[str, Any] | None,
    expected_busbw: float | None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = {}
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(summary.steps, summary.losses, marker=".")
    ax.set(xlabel="step", ylabel="loss", title="Training loss")
    ax.grid(alpha=0.3)
    images["loss"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(summary.steps, summary.tokens_per_s, marker=".", color="tab:green")
    ax.set(xlabel="step", ylabel="tokens/s (all devices)", title="Throughput")
    ax.grid(alpha=0.3)
    images["throughput"] = _png(fig)
    plt.close(fig)

    if preflight and preflight.get("allreduce"):
        sweep = preflight["allreduce"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot([r["bytes"] for r in sweep], [r["busbw_gbps"] for r in sweep], marker="o", label="measured")
        if expected_busbw:
            ax.axhline(expected_busbw, color="tab:red", linestyle="--", label="expected (instance type)")
        ax.set(xscale="log", xlabel="message size (bytes)", ylabel="busbw (GB/s)", title="All-reduce bus bandwidth")
        ax.legend()
        ax.grid(alpha=0.3)
        images["busbw"] = _png(fig)
        plt.close(fig)

    if history:
        runs = [*history, {"final_loss": summary.final_loss, "median_tokens_per_s": summary.median_tokens_per_s}]
        xs = list(range(-len(history), 1))
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.plot(xs, [r["final_loss"] for r in runs], marker="o", color="tab:blue", label="final loss")
        ax.set(xlabel="run (0 = this run)", ylabel="final loss", title="Trend over recent comparable runs")
        twin = ax.twinx()
        twin.plot(
            xs, [r.get("median_tokens_per_s") or 0 for r in runs], marker="s", color="tab:green", label="tokens/s"
        )
        twin.set_ylabel("median tokens/s")
        fig.legend(loc="lower left")
        ax.grid(alpha=0.3)
        images["trend"] = _png(fig)
        plt.close(fig)
    return images


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def render_report(
    spec: dict[str, Any],
    summary: TrainingSummary,
    preflight: dict[str, Any] | None,
    gate_failures: list[str],
    resources: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
) -> str:
    expected = spec["instance"]["expected_busbw_gbps"]
    images = plots(summary, preflight, expected, history)
    verdict = "PASSED" if not gate_failures else "FAILED"
    key_metrics = {
        "first loss": summary.first_loss,
        "final loss": summary.final_loss,
        "median tokens/s": summary.median_tokens_per_s,
        "MFU": summary.mfu if summary.mfu is not None else "n/a (no known peak FLOPs for this device)",
        "max memory (MB)": summary.max_memory_mb,
        "parameters": summary.params,
        "world size": summary.world_size,
        "checkpoints at steps": ", ".join(map(str, summary.checkpoints)),
        "restarts": summary.restarts,
    }
    figures = "".join(
        f'<figure><img alt="{name}" src="{uri}"><figcaption>{name}</figcaption></figure>'
        for name, uri in images.items()
    )
    gates = "".join(f"<li>{html.escape(f)}</li>" for f in gate_failures) or "<li>all gates passed</li>"
    title = f"DTP run {spec['names']['run_key']}"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figure{{display:inline-block;margin:.5em}}
.PASSED{{color:#187a18}}.FAILED{{color:#b00}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p>DAG <code>{html.escape(spec["dag_id"])}</code>, run <code>{html.escape(spec["run_id"])}</code>,
recipe <b>{html.escape(spec["params"]["recipe"])}</b> on <b>{html.escape(spec["params"]["platform"])}</b>.
Gates: <b class="{verdict}">{verdict}</b></p>
<ul>{gates}</ul>
<h2>Key metrics</h2>{_table(key_metrics)}
<h2>Plots</h2>{figures}
<h2>Parameters</h2>{_table(spec["params"])}
<h2>Resources</h2>{_table(resources)}
</body></html>
"""
