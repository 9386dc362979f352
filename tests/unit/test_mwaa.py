"""The MWAA bundle works as MWAA would load it, and the environment requests fit the real API shapes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from botocore.validate import ParamValidator

from dtp.deploy.mwaa import (
    DAGS_DIR,
    MWAA_TAGS,
    PACKAGE_MARKER,
    UPLOAD_MANIFEST,
    MwaaTarget,
    create_or_update,
    environment_request,
    main,
    out_problem,
    package,
    target_problems,
    update_request,
    upload,
)
from dtp.local.config import PROJECT_ROOT

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


# No versions: those DTP pins (for its Airflow) would contradict the constraints of another, and pip would refuse.
REQUIREMENTS = """\
--constraint "https://raw.githubusercontent.com/apache/airflow/constraints-3.1.7/constraints-3.11.txt"
apache-airflow-providers-amazon
apache-airflow-providers-cncf-kubernetes
apache-airflow-providers-celery
celery[redis]
apache-airflow-providers-ssh
apache-airflow-providers-standard
packer-py
ansible-core
boto3
botocore
pydantic
jinja2
pyyaml
regex
matplotlib
numpy
"""


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
    # The local stack and this deploy tool stay home; the DAGs parse without them (test_bundle_dags_parse...).
    assert not [n for n in names if n.startswith(("dtp/local/", "dtp/deploy/"))]
    assert bundle["requirements"].read_text() == REQUIREMENTS
    assert f"export DTP_INCLUDE_DIR={DAGS_DIR}/include" in bundle["startup"].read_text()
    assert f"export DTP_IMAGES_DIR={DAGS_DIR}/images" in bundle["startup"].read_text()


def test_an_airflow_older_than_the_dags_need_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--airflow-version 3\.0\.6: DTP's DAGs need Airflow 3\.1 or newer"):
        package(tmp_path / "out", "3.0.6")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "version",
    ["abc", "3.1", "3.1.7rc1", '3.1.7" --extra-index-url "https://example.com', "3.1.7\n--extra-index-url x"],
)
def test_an_airflow_version_must_be_a_release_number(tmp_path: Path, version: str) -> None:
    """It goes into requirements.txt: anything but MAJOR.MINOR.PATCH could add pip options there."""
    with pytest.raises(ValueError, match=r"--airflow-version .*: must be an Airflow release, MAJOR\.MINOR\.PATCH"):
        package(tmp_path / "out", version)
    assert not (tmp_path / "out").exists()


def test_the_environments_python_picks_the_constraints_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["package", "--out", str(out), "--airflow-version", "3.1.7", "--python-version", "3.12"]) == 0
    assert (out / "requirements.txt").read_text().splitlines()[0].endswith('/constraints-3.1.7/constraints-3.12.txt"')
    with pytest.raises(SystemExit) as exit_info:  # it goes into requirements.txt, as --airflow-version does
        main(["package", "--out", str(tmp_path / "other"), "--python-version", '3.12.txt" -i "https://example.com'])
    assert exit_info.value.code == 2 and "--python-version '3.12.txt\" -i" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_package_replaces_only_a_folder_of_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not empty and no earlier package made it \(it has no \.dtp-mwaa-package"):
        package(mine, "3.1.7")
    with pytest.raises(SystemExit) as exit_info:
        main(["package", "--out", str(mine)])
    assert exit_info.value.code == 2 and f"--out {mine}: {mine} is not empty" in capsys.readouterr().err
    assert (mine / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "a-file").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not a folder"):
        package(tmp_path / "a-file", "3.1.7")
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize("folder", [PROJECT_ROOT, PROJECT_ROOT.parent, PROJECT_ROOT / "plugins" / ".."])
def test_the_project_is_never_replaced(folder: Path) -> None:
    """Checked without packaging there: were the check wrong, packaging would delete the checkout."""
    assert (
        out_problem(folder)
        == f"--out {folder}: it holds the project ({PROJECT_ROOT}); choose a folder of its own, e.g. build/mwaa"
    )


def test_package_takes_a_new_or_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert out_problem(tmp_path / "empty") is None and out_problem(tmp_path / "new" / "out") is None


def test_package_replaces_an_earlier_package(tmp_path: Path) -> None:
    out = tmp_path / "out"
    package(out, "3.1.7")
    assert (out / PACKAGE_MARKER).is_file()
    (out / "dags" / "stale_dag.py").write_text("")
    parts = package(out, "3.1.7")
    assert not (out / "dags" / "stale_dag.py").exists() and parts["startup"].is_file()


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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "1dtp", r"--name '1dtp': must be 1-80 letters"),
        ("name", "dtp env", r"--name 'dtp env': must be 1-80 letters"),
        ("name", "d" * 81, r"--name 'd{81}': must be 1-80 letters"),
        ("execution_role_arn", "arn:aws:iam::12345:role/x", r"--role-arn .*: must be an IAM role ARN"),
        ("execution_role_arn", "arn:aws:iam::123456789012:user/x", r"--role-arn .*: must be an IAM role ARN"),
        (
            "execution_role_arn",
            "arn:aws:iam::123456789012:role/mwaa",
            r"--role-arn '.*role/mwaa': the role's name must start",
        ),
        (
            "execution_role_arn",
            "arn:aws:iam::123456789012:role/service-role/dtp-mwaa",
            r"must start with 'dtp-', with no path: dtp-mwaa-deploy-policy.json lets the deploy pass only dtp-\* roles",
        ),
        (
            "execution_role_arn",
            "arn:aws:iam::123456789012:role/dtp-ops/Admin",
            r"--role-arn '.*role/dtp-ops/Admin': the role's name must start with 'dtp-', with no path",
        ),
        ("subnet_ids", ["subnet-0123456789abcdef0", "subnet-xyz"], r"--subnets 'subnet-xyz': must be a subnet id"),
        ("subnet_ids", ["subnet-0123456789abcdef0"] * 2, r"MWAA needs two different subnets"),
        ("subnet_ids", ["subnet-0123456789abcdef0"], r"MWAA needs two different subnets"),
        ("security_group_ids", ["sg-1"], r"--security-group 'sg-1': must be a security group id"),
        ("security_group_ids", [], r"security groups \[\]: MWAA takes 1 to 5"),
        ("bucket", "DTP-mwaa", r"--bucket 'DTP-mwaa': must be 3-63 lowercase letters"),
        ("bucket", "ab", r"--bucket 'ab': must be 3-63"),
        ("bucket", "dtp-", r"--bucket 'dtp-': must be 3-63 .* starting and ending with a letter or digit"),
        ("bucket", "dtp..mwaa", r"must not hold two adjacent dots or look like an IP address"),
        ("bucket", "192.168.1.10", r"must not hold two adjacent dots or look like an IP address"),
        ("bucket", "xn--dtp-mwaa", r"S3 reserves the prefixes xn--"),
        ("bucket", "dtp-mwaa-s3alias", r"S3 reserves the prefixes .* and the suffixes -s3alias"),
        ("airflow_version", "abc", r"--airflow-version 'abc': must be an Airflow release"),
        ("airflow_version", "2.10.3", r"--airflow-version 2\.10\.3: DTP's DAGs need Airflow 3\.1 or newer"),
    ],
)
def test_a_target_mwaa_or_s3_would_refuse_is_refused(field: str, value: Any, message: str) -> None:
    problems = target_problems(dataclasses.replace(TARGET, **{field: value}))
    assert len(problems) == 1 and re.search(message, problems[0]), problems


def test_a_target_within_the_rules_is_taken() -> None:
    assert target_problems(TARGET) == []
    target = dataclasses.replace(
        TARGET,
        name="D" + "-_9" * 26 + "x",
        execution_role_arn="arn:aws-cn:iam::123456789012:role/dtp-mwaa.x+1",
        subnet_ids=["subnet-0123abcd", "subnet-0123456789abcdef1"],
        bucket="dtp.mwaa-1",
    )
    assert len(target.name) == 80 and target_problems(target) == []


def test_the_environment_is_tagged_as_dtps_by_default() -> None:
    untagged = {k: v for k, v in dataclasses.asdict(TARGET).items() if k != "tags"}
    assert (
        environment_request(MwaaTarget(**untagged), VERSIONS)["Tags"]
        == MWAA_TAGS
        == {
            "dtp:owner": "dtp",
            "dtp:role": "mwaa",
        }
    )


@pytest.fixture
def s3(moto_aws: Callable[[str], Any]) -> Any:
    return moto_aws("s3")


def test_deploy_checks_every_input_before_any_aws_call(
    s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["deploy", "--out", str(tmp_path / "out"), "--name", "dtp", "--bucket", "dtp-mwaa-123456789012"]
    argv += ["--role-arn", "arn:aws:iam::123456789012:role/dtp-mwaa", "--security-group", "sg-0123456789abcdef0"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--subnets", "subnet-0123456789abcdef0", "subnet-b", "--airflow-version", "3.1.7\n-i x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--subnets 'subnet-b': must be a subnet id" in err
    assert "--airflow-version '3.1.7\\n-i x': must be an Airflow release" in err
    assert s3.list_buckets()["Buckets"] == [] and not (tmp_path / "out").exists()


def test_upload_creates_a_tagged_versioned_bucket(s3: Any, bundle: dict[str, Path]) -> None:
    versions = upload(bundle, "dtp-mwaa-123456789012", "aws_default")
    tags = s3.get_bucket_tagging(Bucket="dtp-mwaa-123456789012")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tags} == {"dtp:owner": "dtp", "dtp:role": "mwaa"}
    assert s3.get_bucket_versioning(Bucket="dtp-mwaa-123456789012")["Status"] == "Enabled"
    assert set(versions) == {"plugins", "requirements", "startup"} and all(versions.values())
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="dtp-mwaa-123456789012", MaxKeys=1000)["Contents"]}
    assert {"plugins.zip", "requirements.txt", "startup.sh", "dags/train_e2e.py", "dags/.airflowignore"} <= keys
    assert PACKAGE_MARKER not in keys


def test_upload_deletes_what_the_previous_upload_left_in_the_dags_folder_and_nothing_else(
    s3: Any, bundle: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    # A DAG and a recipe removed since the previous upload: MWAA would keep loading them. Another team's DAG in the
    # same folder was never DTP's.
    bucket = "dtp-mwaa-123456789012"
    s3.create_bucket(Bucket=bucket)
    earlier = ["dags/train_e2e.py", "dags/removed_dag.py", "dags/include/recipes/removed.yaml"]
    for key in [*earlier, "dags/their_dag.py", "notes/keep.txt"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"old")
    s3.put_object(Bucket=bucket, Key=UPLOAD_MANIFEST, Body=json.dumps(earlier).encode())
    with caplog.at_level(logging.INFO, logger="dtp.deploy.mwaa"):
        upload(bundle, bucket, "aws_default")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, MaxKeys=1000)["Contents"]}
    assert {"dags/train_e2e.py", "dags/their_dag.py", "notes/keep.txt"} <= keys
    assert not {"dags/removed_dag.py", "dags/include/recipes/removed.yaml"} & keys
    deleted = [m for m in caplog.messages if m.startswith("Deleting")]
    assert deleted == [
        f"Deleting s3://{bucket}/dags/include/recipes/removed.yaml: the previous upload's, not in this one",
        f"Deleting s3://{bucket}/dags/removed_dag.py: the previous upload's, not in this one",
    ]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=UPLOAD_MANIFEST)["Body"].read())
    assert "dags/train_e2e.py" in manifest and "dags/their_dag.py" not in manifest
