"""The MWAA bundle works as MWAA would load it, and the environment requests fit the real API shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from botocore.validate import ParamValidator

from dtp.deploy.mwaa import DAGS_DIR, MwaaTarget, create_or_update, environment_request, package, update_request

VERSIONS = {"plugins": "v-plugins", "requirements": "v-req", "startup": "v-startup"}
TARGET = MwaaTarget(
    name="dtp",
    bucket="dtp-mwaa-123456789012",
    execution_role_arn="arn:aws:iam::123456789012:role/dtp-mwaa",
    subnet_ids=["subnet-0123456789abcdef0", "subnet-0123456789abcdef1"],
    security_group_ids=["sg-0123456789abcdef0"],
    airflow_version="3.1.7",
    tags={"dtp:owner": "dtp"},
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return package(tmp_path_factory.mktemp("mwaa") / "out", "3.1.7")


def test_bundle_layout(bundle: dict[str, Path]) -> None:
    assert (bundle["dags"] / "train_e2e.py").exists() and (
        bundle["dags"] / "include" / "recipes" / "tiny.yaml"
    ).exists()
    assert (bundle["dags"] / ".airflowignore").read_text() == "include/\nimages/\n"
    assert (bundle["dags"] / "images" / "packer" / "versions.pkrvars.hcl").is_file()
    assert not (bundle["dags"] / "images" / "containers" / "airflow").exists()
    names = zipfile.ZipFile(bundle["plugins"]).namelist()
    assert "dtp_plugin.py" in names and "dtp/params.py" in names and not [n for n in names if "__pycache__" in n]
    lines = bundle["requirements"].read_text().splitlines()
    assert (
        lines[0]
        == '--constraint "https://raw.githubusercontent.com/apache/airflow/constraints-3.1.7/constraints-3.11.txt"'
    )
    assert "apache-airflow-providers-amazon==9.39.0" in lines
    assert f"export DTP_INCLUDE_DIR={DAGS_DIR}/include" in bundle["startup"].read_text()
    assert f"export DTP_IMAGES_DIR={DAGS_DIR}/images" in bundle["startup"].read_text()


def test_an_airflow_older_than_the_dags_need_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--airflow-version 3\.0\.6: DTP's DAGs need Airflow 3\.1 or newer"):
        package(tmp_path / "out", "3.0.6")
    assert not (tmp_path / "out").exists()


def test_bundle_dags_parse_from_the_plugins_zip(bundle: dict[str, Path]) -> None:
    """As on MWAA: plugins.zip on the path, DTP_INCLUDE_DIR from the startup script, the DAGs folder parsed."""
    code = (
        "from airflow.dag_processing.dagbag import DagBag\n"
        f"bag = DagBag({str(bundle['dags'])!r})\n"
        "assert not bag.import_errors, bag.import_errors\n"
        "import json; print(json.dumps(sorted(bag.dag_ids)))\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DTP_INCLUDE_DIR")},
        "PYTHONPATH": str(bundle["plugins"]),
        "DTP_INCLUDE_DIR": str(bundle["dags"] / "include"),
        "DTP_IMAGES_DIR": str(bundle["dags"] / "images"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"train_e2e", "validate_cluster", "reaper", "regression__tiny"} <= set(
        json.loads(done.stdout.splitlines()[-1])
    )


def _shape(operation: str):
    return boto3.client("mwaa", region_name="us-east-1").meta.service_model.operation_model(operation).input_shape


def test_requests_fit_the_mwaa_api() -> None:
    request = environment_request(TARGET, VERSIONS)
    for params, operation in ((request, "CreateEnvironment"), (update_request(request), "UpdateEnvironment")):
        report = ParamValidator().validate(params, _shape(operation))
        assert not report.has_errors(), report.generate_report()
    assert "Tags" not in update_request(request)
    assert update_request(request)["NetworkConfiguration"] == {"SecurityGroupIds": TARGET.security_group_ids}
    assert request["NetworkConfiguration"]["SubnetIds"] == TARGET.subnet_ids
    assert request["WebserverAccessMode"] == "PRIVATE_ONLY"


def test_creates_when_absent_updates_when_present() -> None:
    client = boto3.client("mwaa", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    request = environment_request(TARGET, VERSIONS)
    arn = "arn:aws:airflow:us-east-1:123456789012:environment/dtp"
    with Stubber(client) as stub:
        stub.add_client_error("get_environment", "ResourceNotFoundException", expected_params={"Name": "dtp"})
        stub.add_response("create_environment", {"Arn": arn}, expected_params=request)
        assert create_or_update(client, request) == arn
        stub.add_response("get_environment", {"Environment": {"Name": "dtp"}}, expected_params={"Name": "dtp"})
        stub.add_response("update_environment", {"Arn": arn}, expected_params=update_request(request))
        assert create_or_update(client, request) == arn
        stub.assert_no_pending_responses()
