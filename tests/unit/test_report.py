"""dtp.metrics.report.render_report: one self-contained HTML page with embedded PNG plots, escaped text."""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from dtp.metrics import report
from dtp.metrics.parse import TrainingSummary
from dtp.metrics.report import NO_MFU, TREND_RUNS, render_report, render_validation_report
from dtp.recipes import FRAMEWORK_PARALLELISM

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL = "<script>alert(1)</script>"


def spec(recipe: str = "tiny", framework: str = "fsdp", **params: Any) -> dict[str, Any]:
    return {
        "dag_id": "train_e2e",
        "run_id": "manual__2026-01-01T00:00:00+00:00",
        "names": {"run_key": "dtp-train-e2e-0123456789"},
        "instance": {"expected_busbw_gbps": 0.05},
        "recipe": {"name": recipe, "framework": framework},
        "params": {"recipe": recipe, "platform": "local", "num_nodes": 2, **params},
    }


SUMMARY = TrainingSummary(
    steps=[5, 10, 15, 20],
    losses=[4.4, 3.4, 3.1, 3.0],
    tokens_per_s=[10000.0, 21000.0, 24000.0, 23000.0],
    checkpoints=[10, 20],
    warm_up_steps=[5],
    restarts=1,
    params=459392,
    world_size=2,
    max_memory_mb=420.5,
    finished=True,
)
PREFLIGHT = {"allreduce": [{"bytes": 1 << 16, "busbw_gbps": 0.02}, {"bytes": 1 << 18, "busbw_gbps": 0.06}]}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data, validate=True) for data in DATA_URI.findall(page)]


def assert_valid_pngs(blobs: list[bytes]) -> None:
    from PIL import Image  # matplotlib's own dependency: always there

    for blob in blobs:
        assert blob.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(blob)) as img:
            img.verify()
            assert img.format == "PNG"
            assert img.size[0] > 100 and img.size[1] > 100


@pytest.fixture(scope="module")
def full_report() -> str:
    return render_report(spec(), SUMMARY, PREFLIGHT, [], {"network_stack": "dtp-train-e2e-0123456789-network"})


def test_report_with_preflight_has_three_pngs(full_report: str) -> None:
    blobs = images(full_report)
    assert len(blobs) == 3
    assert_valid_pngs(blobs)
    for name in ("loss", "throughput", "busbw"):
        assert f'<img alt="{name}" src="data:image/png;base64,' in full_report


def test_report_without_preflight_has_two_pngs() -> None:
    page = render_report(spec(), SUMMARY, None, [], {})
    blobs = images(page)
    assert len(blobs) == 2
    assert_valid_pngs(blobs)
    assert 'alt="busbw"' not in page


def test_report_content(full_report: str) -> None:
    assert full_report.startswith("<!doctype html>")
    assert "<title>DTP run dtp-train-e2e-0123456789</title>" in full_report
    assert '<b class="PASSED">PASSED</b>' in full_report
    assert "<li>all gates passed</li>" in full_report
    assert "<tr><th>checkpoints at steps</th><td>10, 20</td></tr>" in full_report
    assert "<tr><th>restarts</th><td>1</td></tr>" in full_report
    assert "<tr><th>max memory (MiB)</th><td>420.5</td></tr>" in full_report  # the trainers' 2**20 bytes
    assert "<tr><th>median tokens/s</th><td>23000.0</td></tr>" in full_report
    assert "DTP&#x27;s trainer reports MFU for bf16 runs on instance types with a known dense bf16 peak" in full_report
    assert "<tr><th>network_stack</th><td>dtp-train-e2e-0123456789-network</td></tr>" in full_report
    assert "run <code>manual__2026-01-01T00:00:00+00:00</code>" in full_report


def test_report_is_well_formed(full_report: str) -> None:
    class Checker(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[str] = []

        def handle_starttag(self, tag: str, attrs: list) -> None:
            if tag not in {"meta", "img"}:
                self.stack.append(tag)

        def handle_endtag(self, tag: str) -> None:
            assert self.stack.pop() == tag

    checker = Checker()
    checker.feed(full_report)
    checker.close()
    assert checker.stack == []


def test_failed_gates_are_listed_and_escaped() -> None:
    page = render_report(spec(), SUMMARY, None, ["final_loss: 3.0 > allowed 2.3", f"x {EVIL}"], {})
    assert '<b class="FAILED">FAILED</b>' in page
    assert "<li>final_loss: 3.0 &gt; allowed 2.3</li>" in page
    assert EVIL not in page


def test_html_in_params_and_resources_is_escaped() -> None:
    evil_spec = spec(recipe=EVIL, dataset_uri=f's3://b/"{EVIL}', **{EVIL: EVIL})
    evil_spec["run_id"] = f"manual__{EVIL}"
    evil_spec["names"]["run_key"] = EVIL
    evil_spec["params"]["platform"] = EVIL
    page = render_report(evil_spec, SUMMARY, None, [], {EVIL: EVIL, "bucket": f"<img src=x onerror={EVIL}>"})
    assert "<script" not in page.lower()
    assert "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert f"recipe <b>{'&lt;script&gt;alert(1)&lt;/script&gt;'}</b>" in page


def test_report_of_a_run_without_steps() -> None:
    page = render_report(spec(), TrainingSummary(), None, ["no training step was logged"], {})
    assert len(images(page)) == 2
    assert "<li>no training step was logged</li>" in page


def test_checks_that_could_not_run_are_listed_apart_from_the_verdict() -> None:
    warning = "node n2: Xid errors not checked: the job's user may not read the kernel log"
    result = {**PREFLIGHT, "failures": [], "warnings": [warning], "versions": {"n1": {"torch": "2.13.0"}}}
    validation = render_validation_report(
        spec(slurm_conn_id="slurm_default", instance_type="p5.48xlarge"), {**result, "ranks": []}
    )
    run = render_report(spec(), SUMMARY, result, [], {})
    for page in (validation, run):
        assert '<b class="PASSED">PASSED</b>' in page
        assert f"<h3>Not checked</h3><ul><li>{warning.replace(chr(39), '&#x27;')}</li></ul>" in page
    assert "Not checked" not in render_report(spec(), SUMMARY, {**result, "warnings": []}, [], {})


@pytest.mark.parametrize("framework", sorted(FRAMEWORK_PARALLELISM))
def test_a_run_without_mfu_says_why_for_its_framework(framework: str) -> None:
    page = render_report(spec(framework=framework), SUMMARY, None, [], {})
    assert f"<tr><th>MFU</th><td>{NO_MFU[framework].replace(chr(39), '&#x27;')}</td></tr>" in page
    # Only DTP's trainer has bf16 as its reason: a bf16 Megatron-LM or NeMo run has none because its log has none.
    assert ("bf16" in NO_MFU[framework]) == (framework == "fsdp")
    if framework in ("megatron-lm", "nemo", "neuronx-distributed"):
        assert "log prints no MFU" in NO_MFU[framework]


@pytest.fixture
def trend_figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the report draws, by their order, each kept open (instead of rendered) for the test to read."""
    figures: list[Any] = []
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or "data:image/png;base64,")
    return figures


def _lines(fig: Any) -> list[list[tuple[list[float], list[float], str]]]:
    """The lines plotted on each axis of the figure (the loss's, then the tokens/s'): x data, y data, marker."""
    return [
        [([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()], line.get_marker())
         for line in ax.get_lines()]
        for ax in fig.axes
    ]  # fmt: skip


def test_the_trend_shows_a_missing_throughput_as_a_gap_and_marks_failed_runs(trend_figures: list[Any]) -> None:
    history = [
        {"final_loss": 3.1, "median_tokens_per_s": 20000.0, "passed": True},
        {"final_loss": 3.9, "median_tokens_per_s": None, "passed": False},
        {"final_loss": 3.0, "median_tokens_per_s": 21000.0},  # recorded before the verdict was kept: passed
    ]
    render_report(spec(), SUMMARY, None, ["final_loss regressed"], {}, history)
    loss_axis, tps_axis = _lines(trend_figures[-1])
    (xs, losses, _), *loss_crosses = loss_axis
    (_, tps, _), *tps_crosses = tps_axis
    assert xs == [-3, -2, -1, 0] and losses == [3.1, 3.9, 3.0, 3.0]
    assert math.isnan(tps[1]) and tps[::2] == [20000.0, 21000.0]  # a gap, not a fall to 0
    # The failed run and this one (its gates failed) are crossed on both axes; the passing ones are not.
    assert [(x, m) for x, _, m in loss_crosses + tps_crosses] == [([-2, 0], "X"), ([-2, 0], "X")]


def test_the_trend_shows_the_last_comparable_runs_only(trend_figures: list[Any]) -> None:
    history = [{"final_loss": 4.0 + i, "median_tokens_per_s": 1000.0, "passed": True} for i in range(120)]
    render_report(spec(), SUMMARY, None, [], {}, history)
    loss_axis, tps_axis = _lines(trend_figures[-1])
    (xs, losses, _), *crosses = loss_axis
    assert len(xs) == TREND_RUNS + 1 == 51 and xs[0] == -TREND_RUNS and losses[0] == 4.0 + 120 - TREND_RUNS
    assert crosses == [] and len(tps_axis) == 1  # no run failed: nothing crossed


def test_a_capacity_fallbacks_instance_type_is_shown() -> None:
    asked = spec(instance_type="p5.48xlarge")
    page = render_report(asked, SUMMARY, None, [], {}, actual_instance_type="p5e.48xlarge")
    assert "<tr><th>instance type</th><td>p5e.48xlarge (capacity fallback: the run asked for p5.48xlarge)</td>" in page
    assert "capacity fallback" not in render_report(asked, SUMMARY, None, [], {}, actual_instance_type="p5.48xlarge")


def test_extra_env_is_shown_by_its_names_and_never_its_values() -> None:
    # The report is published to the artifacts bucket behind a presigned URL; extra_env may hold tokens.
    env = {"HF_TOKEN": "hf_secret123", "NCCL_DEBUG": "INFO"}
    run = render_report(spec(extra_env=env), SUMMARY, None, [], {})
    validation = render_validation_report(
        spec(slurm_conn_id="slurm_default", instance_type="p5.48xlarge", extra_env=env), {"ranks": []}
    )
    for page in (run, validation):
        assert "hf_secret123" not in page and "INFO" not in page
        assert "<tr><th>extra_env</th><td>HF_TOKEN=***, NCCL_DEBUG=***</td></tr>" in page
        assert "<tr><th>num_nodes</th><td>2</td></tr>" in page  # the other parameters as they are
