"""A run's HTML report: params, resources, gates, and plots as embedded PNGs.

The PNGs are embedded as data URIs so the report is one self-contained object
that opens the same from S3, a presigned URL or a local file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any

from dtp.metrics.parse import TrainingSummary

# Earlier comparable runs the trend plot shows besides this one.
TREND_RUNS = 50
# Why a run has no MFU, by framework. The trainer reports its own; another framework's run has one by the trainer's
# accounting (dtp.metrics.framework_logs), whatever its log prints, where the instance type's peak is known.
_NO_PEAK = "DTP counts its MFU against the instance type's peak FLOP/s, and none is known"
NO_MFU = {
    # The trainer reports MFU against the instance type's dense bf16 peak: fp32 runs and devices without one have none.
    "fsdp": "n/a (DTP's trainer reports MFU for bf16 runs on instance types with a known dense bf16 peak)",
    "torchtitan": f"n/a (torchtitan's log prints an MFU by its own accounting; {_NO_PEAK})",
    "picotron": f"n/a (picotron's log prints an MFU by its own accounting; {_NO_PEAK})",
    "megatron-lm": f"n/a (Megatron-LM's log prints no MFU; {_NO_PEAK})",
    "nemo": f"n/a (NeMo's log prints no MFU; {_NO_PEAK})",
    "neuronx-distributed": f"n/a (neuronx-distributed's log prints no MFU; {_NO_PEAK})",
}


# What a masked value shows instead of itself.
MASK = "***"


def no_mfu(framework: str) -> str:
    """Why a run of ``framework`` has no MFU, for the report."""
    return NO_MFU.get(framework, f"n/a ({framework} reports none)")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def busbw_plot(sweep: list[dict[str, Any]], expected: dict[str, Any] | None) -> str:
    """Measured all-reduce busbw against message size, with the expected figure and the pass floor."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["bytes"] for r in sweep], [r["busbw_gbps"] for r in sweep], marker="o", label="measured")
    if expected:
        ax.plot([expected["at_bytes"]], [expected["gbps"]], "r*", markersize=12, label="expected (instance type)")
        ax.axhline(expected["floor"], color="tab:red", linestyle="--", label="pass floor")
    ax.set(xscale="log", xlabel="message size (bytes)", ylabel="busbw (GB/s)", title="All-reduce bus bandwidth")
    ax.legend()
    ax.grid(alpha=0.3)
    image = _png(fig)
    plt.close(fig)
    return image


def plots(
    summary: TrainingSummary,
    preflight: dict[str, Any] | None,
    history: list[dict[str, Any]] | None = None,
    passed: bool = True,
) -> dict[str, str]:
    """The report's plots as base64 PNGs, by name: loss, throughput, preflight's bus bandwidth, and the recipe's
    recent comparable runs when there are any (``passed``: whether this run passed its gates)."""
    plt = _pyplot()

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
        images["busbw"] = busbw_plot(preflight["allreduce"], preflight.get("expected_busbw"))

    if history:
        images["trend"] = trend_plot(plt, summary, history, passed)
    return images


def _value(number: Any) -> float:
    """A number to plot; a missing one is NaN, which matplotlib leaves as a gap (not a fall to 0)."""
    return float(number) if number is not None else math.nan


def trend_plot(plt: Any, summary: TrainingSummary, history: list[dict[str, Any]], passed: bool) -> str:
    """Final loss and median tokens/s of this run (at 0) and the last ``TREND_RUNS`` comparable runs before it (the
    history holds more: the regression gates' baseline reaches further back); a run that failed its gates is marked
    with a red cross, a run without a figure leaves a gap."""
    this = {"final_loss": summary.final_loss, "median_tokens_per_s": summary.median_tokens_per_s, "passed": passed}
    runs = [*history[-TREND_RUNS:], this]
    xs = list(range(1 - len(runs), 1))
    losses = [_value(r.get("final_loss")) for r in runs]
    tps = [_value(r.get("median_tokens_per_s")) for r in runs]
    failed = [i for i, r in enumerate(runs) if not r.get("passed", True)]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(xs, losses, marker="o", color="tab:blue", label="final loss")
    ax.set(xlabel="run (0 = this run)", ylabel="final loss", title="Trend over recent comparable runs")
    twin = ax.twinx()
    twin.plot(xs, tps, marker="s", color="tab:green", label="tokens/s")
    twin.set_ylabel("median tokens/s")
    if failed:
        cross = {"linestyle": "none", "marker": "X", "markersize": 10, "color": "tab:red"}
        ax.plot([xs[i] for i in failed], [losses[i] for i in failed], label="failed its gates", **cross)
        twin.plot([xs[i] for i in failed], [tps[i] for i in failed], **cross)
    fig.legend(loc="lower left")
    ax.grid(alpha=0.3)
    image = _png(fig)
    plt.close(fig)
    return image


def _table(rows: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows.items())
    return f"<table>{cells}</table>"


def shown_params(params: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters as a report shows them: ``extra_env`` by its names alone (``HF_TOKEN=***``). Its values
    are the jobs' environment, which may hold tokens (the batch script exporting them is its owner's alone), and a
    report is published to the artifacts bucket behind a presigned URL. The other parameters are names, sizes, S3
    URIs and switches, shown as they are."""
    env = params.get("extra_env")
    if not env:
        return params
    return {**params, "extra_env": ", ".join(f"{name}={MASK}" for name in env)}


def _grid(rows: dict[str, dict[str, Any]]) -> str:
    """A table with one row per key of ``rows`` (a node) and one column per inner key (a component)."""
    columns = sorted({c for row in rows.values() for c in row})
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["node", *columns])
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in columns)
        for name, row in sorted(rows.items())
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _figures(images: dict[str, str]) -> str:
    return "".join(
        f'<figure><img alt="{name}" src="{uri}"><figcaption>{name}</figcaption></figure>'
        for name, uri in images.items()
    )


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}figure{{display:inline-block;margin:.5em}}
pre{{background:#f6f6f6;padding:.5em}}.PASSED{{color:#187a18}}.FAILED{{color:#b00}}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""


def _failures(failures: list[str], none: str) -> str:
    """A list item per failure; multi-line ones (the busbw table) keep their layout."""
    items = (f"<li><pre>{html.escape(f)}</pre></li>" if "\n" in f else f"<li>{html.escape(f)}</li>" for f in failures)
    return "".join(items) or f"<li>{none}</li>"


def _not_checked(result: dict[str, Any]) -> str:
    """The checks that could not run on some node, under a heading of their own; nothing when all ran."""
    warnings = result.get("warnings", [])
    return f"<h3>Not checked</h3><ul>{_failures(warnings, '')}</ul>" if warnings else ""


def _cluster_section(preflight: dict[str, Any] | None) -> str:
    if not preflight or not preflight.get("versions"):
        return ""
    return (
        "<h2>Cluster validation</h2>"
        + _not_checked(preflight)
        + "<p>Versions per node (the reference's efa-versions):</p>"
        + _grid(preflight["versions"])
    )


def render_report(
    spec: dict[str, Any],
    summary: TrainingSummary,
    preflight: dict[str, Any] | None,
    gate_failures: list[str],
    resources: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
    actual_instance_type: str | None = None,
) -> str:
    """The run's HTML report: verdict, key metrics, gate failures, plots, what was not checked, and the resources
    it used; ``actual_instance_type`` is the instance type the cluster got, shown where a capacity fallback made it
    another than the one the run asked for."""
    images = plots(summary, preflight, history, passed=not gate_failures)
    params = spec["params"]
    asked = params.get("instance_type")
    fallback = (
        {"instance type": f"{actual_instance_type} (capacity fallback: the run asked for {asked})"}
        if actual_instance_type and asked and actual_instance_type != asked
        else {}
    )
    key_metrics = {
        **fallback,
        "first loss": summary.first_loss,
        "final loss": summary.final_loss,
        "median tokens/s": summary.median_tokens_per_s,
        "MFU": summary.mfu if summary.mfu is not None else no_mfu(spec.get("recipe", {}).get("framework", "fsdp")),
        "max memory (MiB)": summary.max_memory_mb,
        "parameters": summary.params,
        "world size": summary.world_size,
        "checkpoints at steps": ", ".join(map(str, summary.checkpoints)),
        "restarts": summary.restarts,
    }
    verdict = "PASSED" if not gate_failures else "FAILED"
    body = f"""<p>DAG <code>{html.escape(spec["dag_id"])}</code>, run <code>{html.escape(spec["run_id"])}</code>,
recipe <b>{html.escape(spec["params"]["recipe"])}</b> on <b>{html.escape(spec["params"]["platform"])}</b>.
Gates: <b class="{verdict}">{verdict}</b></p>
<ul>{_failures(gate_failures, "all gates passed")}</ul>
<h2>Key metrics</h2>{_table(key_metrics)}
<h2>Plots</h2>{_figures(images)}
{_cluster_section(preflight)}
<h2>Parameters</h2>{_table(shown_params(spec["params"]))}
<h2>Resources</h2>{_table(resources)}"""
    return _page(f"DTP run {spec['names']['run_key']}", body)


def render_validation_report(spec: dict[str, Any], result: dict[str, Any]) -> str:
    """validate_cluster's report: verdict, per-node environment and versions, bandwidth sweep."""
    failures = result.get("failures", [])
    verdict = "PASSED" if not failures else "FAILED"
    environment = {
        f"rank {r.get('rank')}": {k: r.get(k) for k in ("slurm_node", "host", "device", "matmul_max_abs_error")}
        for r in result.get("ranks", [])
    }
    images = {"busbw": busbw_plot(result["allreduce"], result.get("expected_busbw"))} if result.get("allreduce") else {}
    body = f"""<p>Cluster connection <code>{html.escape(spec["params"]["slurm_conn_id"])}</code>,
{spec["params"]["num_nodes"]} x {html.escape(spec["params"]["instance_type"])}.
Validation: <b class="{verdict}">{verdict}</b></p>
<ul>{_failures(failures, "every check passed")}</ul>
{_not_checked(result)}
<h2>All-reduce bus bandwidth</h2>{_figures(images)}
<h2>Versions per node</h2>{_grid(result.get("versions", {}))}
<h2>Environment per rank</h2>{_grid(environment)}
<h2>Parameters</h2>{_table(shown_params(spec["params"]))}"""
    return _page(f"DTP cluster validation {spec['names']['run_key']}", body)
