"""The metrics history (dtp.metrics.history, and what dtp.pipeline.results.collect_metrics records in it) against
moto's S3: which earlier runs a new run is compared with."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from airflow.providers.amazon.aws.hooks.s3 import S3Hook

from dtp.form_params import parse_params
from dtp.metrics import history
from dtp.metrics.gates import extra_env_digest, recipe_digest
from dtp.params import TrainParams
from dtp.pipeline import results
from dtp.pipeline.spec import run_spec
from dtp.platforms.capacity import instance_fields

BUCKET = "dtp-artifacts-test"
PREFIX = "history/tiny/local/local.cpu/"


@pytest.fixture
def s3(moto_aws: Callable[[str], Any]) -> S3Hook:
    hook = S3Hook(aws_conn_id="aws_default")
    hook.create_bucket(BUCKET)
    return hook


def store(s3: S3Hook, entries: list[dict[str, Any]]) -> None:
    """``entries`` in the history, oldest first, keyed as ``history.record`` keys them (time, then run)."""
    for i, entry in enumerate(entries):
        s3.load_string(json.dumps({"run_key": f"r{i}", **entry}), f"{PREFIX}20261206T{i:06d}-r{i}.json", BUCKET)


def read(s3: S3Hook, **window: Any) -> list[dict[str, Any]]:
    return history.recent(s3, BUCKET, "tiny", "local", "local.cpu", **window)


def test_the_newest_comparable_runs_oldest_first(s3) -> None:
    store(s3, [{"num_nodes": 2, "passed": True}, {"num_nodes": 4, "passed": True}] * 5)
    found = read(s3, where=lambda e: e["num_nodes"] == 2, newest=3, passed=3)
    assert [e["run_key"] for e in found] == ["r4", "r6", "r8"]


def test_a_streak_of_failed_runs_does_not_push_the_passing_ones_out(s3) -> None:
    # The regression gates compare with passing runs only: 60 failed runs after 3 passing ones must leave the
    # baseline in reach, or a lasting regression would switch its own gate off.
    store(s3, [{"passed": True}] * 3 + [{"passed": False}] * 60)
    found = read(s3, where=lambda e: True, newest=50, passed=3)
    assert len(found) == 63 and [e["run_key"] for e in found if e["passed"]] == ["r0", "r1", "r2"]
    assert len(read(s3, where=lambda e: True, newest=50, passed=3, max_reads=20)) == 20


def test_runs_of_other_shapes_do_not_fill_the_window(s3) -> None:
    store(s3, [{"num_nodes": 2, "passed": True}] * 3 + [{"num_nodes": 1, "passed": True}] * 80)
    found = read(s3, where=lambda e: e["num_nodes"] == 2, newest=50, passed=10)
    assert [e["run_key"] for e in found] == ["r0", "r1", "r2"]


# --- what collect_metrics records and compares with -------------------------------------------------------------

IMAGES = {"source": "image r/dtp@sha256:ab", "image": "r/dtp@sha256:ab", "ami": "ami-0123"}


def run_spec_of(run_id: str, extra_env: dict[str, str] | None = None, **recipe_changes: Any) -> dict[str, Any]:
    conf = {"platform": "hyperpod", "recipe": "llama3_1_8b", "instance_type": "p5.48xlarge", "num_nodes": 1}
    conf |= {"max_steps": 4, "checkpoint_interval": 2, "extra_env": extra_env or {}}
    spec = run_spec(parse_params(TrainParams, conf), "train_e2e", run_id)
    return {**spec, "recipe": {**spec["recipe"], **recipe_changes}}


# llama3_1_8b's throughput gate asks for 150000 tokens/s on 4 nodes, 37500 on the one here: the runs here pass it,
# at 400000 or 200000.
def collect(
    tmp_path: Path,
    spec: dict[str, Any],
    tokens_per_s: float,
    cluster: dict[str, Any] | None = None,
    images: dict[str, Any] = IMAGES,
) -> dict[str, Any]:
    steps = [{"event": "step", "step": n, "loss": 5.0 - n, "tokens_per_s": tokens_per_s} for n in range(1, 5)]
    path = tmp_path / f"{spec['names']['run_key']}.jsonl"
    path.write_text("".join(json.dumps(step) + "\n" for step in steps))
    return results.collect_metrics(spec, cluster or {}, images, str(path), "aws_default")


def entries(s3: S3Hook) -> list[dict[str, Any]]:
    bucket = results.artifacts_bucket("aws_default")
    keys = sorted(s3.list_keys(bucket, prefix="history/llama3_1_8b/hyperpod/p5.48xlarge/"))
    return [json.loads(s3.read_key(key, bucket)) for key in keys]


def test_a_changed_recipe_or_image_is_not_judged_against_the_runs_before_it(s3, tmp_path) -> None:
    for i in range(3):
        collect(tmp_path, run_spec_of(f"manual__{i}"), 400000.0)
    # micro_batch doubled on purpose: half the tokens/s of the runs before would fail their median for good.
    changed = run_spec_of("manual__new_recipe", micro_batch=2)
    metrics = collect(tmp_path, changed, 200000.0)
    assert metrics["history"] == [] and results.gate_failures(changed, metrics) == []
    # A new image: the same.
    metrics = collect(tmp_path, run_spec_of("manual__new_image"), 200000.0, images={**IMAGES, "ami": "ami-0456"})
    assert metrics["history"] == [] and metrics["runtime"] == "r/dtp@sha256:ab on ami-0456"
    # The recipe and image of the first three: judged against them, and it regressed.
    same = run_spec_of("manual__same")
    metrics = collect(tmp_path, same, 200000.0)
    assert len(metrics["history"]) == 3
    assert [f.split(":")[0] for f in results.gate_failures(same, metrics)] == ["tokens_per_s regressed"]
    recorded = {e["run_key"]: e for e in entries(s3)}
    assert recorded[changed["names"]["run_key"]]["passed"] is True
    assert recorded[same["names"]["run_key"]]["passed"] is False
    assert recorded[same["names"]["run_key"]]["recipe_digest"] == recipe_digest(same["recipe"])
    assert recorded[same["names"]["run_key"]]["runtime"] == "r/dtp@sha256:ab on ami-0123"


def test_a_capacity_fallbacks_run_is_recorded_and_compared_as_the_type_it_got(s3, tmp_path) -> None:
    fallback = {**instance_fields("p5e.48xlarge"), "placement": "p5e.48xlarge in subnet-1 (on demand)"}
    for i in range(3):
        collect(tmp_path, run_spec_of(f"manual__{i}"), 400000.0)
    metrics = collect(tmp_path, run_spec_of("manual__fell_back"), 200000.0, fallback)
    assert metrics["actual_instance_type"] == "p5e.48xlarge" and metrics["history"] == []
    # Filed under the type it asked for, with the one it got.
    assert [e["actual_instance_type"] for e in entries(s3)].count("p5e.48xlarge") == 1
    assert collect(tmp_path, run_spec_of("manual__p5"), 400000.0)["actual_instance_type"] == "p5.48xlarge"


def test_a_run_with_other_extra_env_starts_a_new_baseline_and_its_values_are_not_recorded(s3, tmp_path) -> None:
    for i in range(3):
        collect(tmp_path, run_spec_of(f"manual__{i}"), 400000.0)
    env = {"NCCL_PROTO": "Simple", "HF_TOKEN": "hf_0123456789abcdef"}
    metrics = collect(tmp_path, run_spec_of("manual__env", extra_env=env), 200000.0)
    assert metrics["history"] == []  # not judged against runs without the variables
    assert len(collect(tmp_path, run_spec_of("manual__no_env"), 400000.0)["history"]) == 3
    recorded = {e["run_key"]: e for e in entries(s3)}[run_spec_of("manual__env")["names"]["run_key"]]
    assert recorded["extra_env_digest"] == metrics["extra_env_digest"] == extra_env_digest(env)
    assert "hf_0123456789abcdef" not in json.dumps(recorded) + json.dumps(metrics)


def test_a_run_whose_every_loss_is_nan_is_judged_diverged_and_still_reported(s3, tmp_path) -> None:
    spec = run_spec_of("manual__nan")
    path = tmp_path / "nan.jsonl"
    path.write_text("".join(f'{{"event": "step", "step": {n}, "loss": NaN, "tokens_per_s": 1.0}}\n' for n in (1, 2)))
    metrics = results.collect_metrics(spec, {}, IMAGES, str(path), "aws_default")
    json.dumps(metrics, allow_nan=False)  # what Airflow's XCom needs
    failures = results.gate_failures(spec, metrics)
    assert failures[:2] == [
        "loss: not finite from step 1 (training diverged), whatever the gates",
        "no training step was logged",
    ]
    report = results.publish_report(spec, metrics, None, {}, "aws_default")
    bucket, key = report["uri"].removeprefix("s3://").split("/", 1)
    assert "training diverged" in s3.read_key(key, bucket)


def test_a_backfilled_runs_entry_says_its_date_type_and_incarnation(
    s3, tmp_path, monkeypatch: pytest.MonkeyPatch, installation: str
) -> None:
    # validate_params puts them in the spec from the DAG run (here a backfill's, cleared once) ...
    from airflow.sdk.api.datamodels._generated import DagRunType

    from dtp.images import container
    from dtp.pipeline import graph

    monkeypatch.setattr(graph, "build_spec", lambda params, conf, names: run_spec_of(names.run_id))
    monkeypatch.setattr(graph.checkpoints, "resume_source", lambda spec, conn_id: None)
    monkeypatch.setattr(graph.data, "dataset_problem", lambda spec, conn_id: None)
    monkeypatch.setattr(container, "framework_image_problem", lambda spec, conn_id: None)
    run_id, logical_date = "backfill__2026-11-20T00:00:00+00:00", datetime(2026, 11, 20, tzinfo=UTC)
    run = SimpleNamespace(
        dag_id="regression__tiny",
        run_id=run_id,
        conf={},
        clear_number=1,
        logical_date=logical_date,
        run_type=DagRunType.BACKFILL,
    )
    spec = graph.validate_params.function(params={}, dag_run=run)
    # ... and the history records them with the run's metrics.
    collect(tmp_path, spec, 400000.0)
    [entry] = entries(s3)
    assert (entry["run_id"], entry["logical_date"]) == (run_id, "2026-11-20T00:00:00+00:00")
    assert (entry["run_type"], entry["incarnation"]) == ("backfill", 1)
    assert json.loads(json.dumps(spec)) == spec  # what the XCom and the history store take
