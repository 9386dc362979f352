"""dtp.metrics.report.render_report: one self-contained HTML page with embedded PNG plots, escaped text."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser
from typing import Any

import pytest

from dtp.metrics.parse import TrainingSummary
from dtp.metrics.report import render_report, render_validation_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL = "<script>alert(1)</script>"


def spec(recipe: str = "tiny", **params: Any) -> dict[str, Any]:
    return {
        "dag_id": "train_e2e",
        "run_id": "manual__2026-01-01T00:00:00+00:00",
        "names": {"run_key": "dtp-train-e2e-0123456789"},
        "instance": {"expected_busbw_gbps": 0.05},
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
    assert "<tr><th>median tokens/s</th><td>23000.0</td></tr>" in full_report
    assert "n/a (measured on bf16 runs, on devices of known peak FLOPs)" in full_report
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
