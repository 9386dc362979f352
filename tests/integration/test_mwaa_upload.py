"""The MWAA bundle uploaded to the emulator's S3: versioned objects, the versions the request pins."""

from __future__ import annotations

import uuid

import pytest

from dtp.deploy.mwaa import MwaaTarget, environment_request, package, upload

pytestmark = pytest.mark.stack


def test_upload_returns_the_versions_mwaa_pins(aws, tmp_path) -> None:
    parts = package(tmp_path / "mwaa", "3.1.7")
    bucket = f"dtp-mwaa-it-{uuid.uuid4().hex[:8]}"
    try:
        versions = upload(parts, bucket, "aws_default")
        s3 = aws("s3")
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
        for name, key in (("plugins", "plugins.zip"), ("requirements", "requirements.txt"), ("startup", "startup.sh")):
            assert s3.head_object(Bucket=bucket, Key=key)["VersionId"] == versions[name]
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="dags/")["Contents"]}
        assert {"dags/train_e2e.py", "dags/include/recipes/tiny.yaml", "dags/.airflowignore"} <= keys
        target = MwaaTarget("dtp", bucket, "arn:aws:iam::123456789012:role/r", ["s-1", "s-2"], ["sg-1"], "3.1.7")
        request = environment_request(target, versions)
        assert request["PluginsS3ObjectVersion"] == versions["plugins"]
        assert request["SourceBucketArn"] == f"arn:aws:s3:::{bucket}"
    finally:
        for version in aws("s3").list_object_versions(Bucket=bucket).get("Versions", []):
            aws("s3").delete_object(Bucket=bucket, Key=version["Key"], VersionId=version["VersionId"])
        aws("s3").delete_bucket(Bucket=bucket)
