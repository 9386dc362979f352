"""ami_bake and container_build through the real scheduler, and train_e2e picking up what they publish."""

from __future__ import annotations

import urllib.parse
import uuid

import pytest

from dtp.images import ami, container

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(2700)]


def _run(api, dag_id: str, conf: dict, timeout: float = 600) -> tuple[str, dict[str, str]]:
    api.wait_for_dag(dag_id)
    run_id = api.trigger(dag_id, conf)
    assert api.wait(dag_id, run_id, timeout=timeout) in ("success", "failed")
    return run_id, {ti["task_id"]: ti["state"] for ti in api.task_instances(dag_id, run_id)}


def _asset_events(api, uri: str) -> list[dict]:
    # An asset first seen through an alias event counts as active only once the DAG is parsed again.
    _, assets = api.request("GET", f"/api/v2/assets?only_active=false&uri_pattern={urllib.parse.quote(uri)}")
    [asset] = [a for a in assets["assets"] if a["uri"].rstrip("/") == uri]
    _, events = api.request("GET", f"/api/v2/assets/events?asset_id={asset['id']}&order_by=-timestamp&limit=50")
    return events["asset_events"]


def test_a_version_change_bakes_a_new_ami_and_publishes_it(airflow_api, aws) -> None:
    versions = [f"2.{uuid.uuid4().int % 10**6}.0", f"2.{uuid.uuid4().int % 10**6}.1"]
    published = []
    for nccl in versions:
        run_id, tasks = _run(airflow_api, "ami_bake", {"families": ["pcluster-cpu"], "nccl_version": nccl})
        assert set(tasks.values()) == {"success"}, tasks
        quoted = urllib.parse.quote(run_id, safe="")
        path = f"/api/v2/dags/ami_bake/dagRuns/{quoted}/taskInstances/family.publish/xcomEntries/return_value"
        _, body = airflow_api.request("GET", f"{path}?map_index=0&deserialize=true")
        published.append(body["value"])
    assert published[0]["ami_id"] != published[1]["ami_id"]
    assert [p["nccl_version"] for p in published] == versions
    newest = aws("ssm").get_parameter(Name=ami.ssm_parameter("pcluster-cpu"))["Parameter"]["Value"]
    assert newest == published[1]["ami_id"]
    events = _asset_events(airflow_api, ami.asset_uri("pcluster-cpu"))
    assert [e["extra"]["ami_id"] for e in events[:2]] == [published[1]["ami_id"], published[0]["ami_id"]]


def test_bad_versions_are_refused_before_a_run_exists(airflow_api) -> None:
    airflow_api.wait_for_dag("ami_bake")
    _, before = airflow_api.request("GET", "/api/v2/dags/ami_bake/dagRuns")
    with pytest.raises(ValueError, match="pattern"):
        airflow_api.trigger("ami_bake", {"families": ["pcluster-cpu"], "nccl_version": "2.27;reboot"})
    _, after = airflow_api.request("GET", "/api/v2/dags/ami_bake/dagRuns")
    assert after["total_entries"] == before["total_entries"]


def test_train_e2e_runs_the_newest_published_image(airflow_api, aws, stack) -> None:
    run_id, tasks = _run(
        airflow_api, "container_build", {"build_args": {"DTP_TRAINING_VERSION": f"3.{uuid.uuid4().hex[:6]}"}}
    )
    assert set(tasks.values()) == {"success"}, tasks
    built = airflow_api.xcom("container_build", run_id, "publish")
    assert aws("ssm").get_parameter(Name=container.training_parameter("local"))["Parameter"]["Value"] == built["image"]
    assert _asset_events(airflow_api, f"oci://{stack.registry}/dtp/local-cpu")[0]["extra"]["digest"] == built["digest"]

    # 200 steps: fewer leave tiny's loss above its final_loss_max gate, and the run fails in evaluate_gates.
    run_id, tasks = _run(airflow_api, "train_e2e", {"max_steps": 200, "checkpoint_interval": 100}, timeout=900)
    assert airflow_api.run_state("train_e2e", run_id) == "success", tasks
    runtime = airflow_api.xcom("train_e2e", run_id, "resolve_images")
    assert runtime["image"] == built["image"]
    assert runtime["ami"] == aws("ssm").get_parameter(Name=ami.ssm_parameter("pcluster-cpu"))["Parameter"]["Value"]
    assert runtime["training_dir"].startswith(str(stack.shared_dir / "images"))
    assert tasks["train.run_job"] == "success" and tasks["teardown_cluster"] == "success", tasks
    spec = airflow_api.xcom("train_e2e", run_id, "validate_params")
    script = (stack.shared_dir / "runs" / spec["names"]["run_key"] / "train.sbatch").read_text()
    assert f"{runtime['training_dir']}/train.py" in script
