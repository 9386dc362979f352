"""Package DTP for Amazon MWAA, upload it, and create or update the environment.

``python -m dtp.deploy.mwaa package`` builds MWAA's layout in a folder:

    dags/                 the DAG files, with include/ (recipes, templates, trainer) under dags/include/
                          and images/packer + the training Dockerfiles under dags/images/
    plugins.zip           plugins/ (the dtp package and the plugin that registers its extra links)
    requirements.txt      DTP's runtime dependencies, under Airflow's constraints for the environment's version
    startup.sh            exports DTP_INCLUDE_DIR and DTP_IMAGES_DIR so dtp finds them inside the DAGs folder

``deploy`` uploads it to a versioned S3 bucket and calls CreateEnvironment, or UpdateEnvironment when
the environment exists, through the amazon provider's MwaaHook, with the object versions MWAA needs.
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow import __version__ as AIRFLOW_VERSION

from dtp.local.config import PROJECT_ROOT

DAGS_DIR = "/usr/local/airflow/dags"  # where MWAA syncs DagS3Path
RUNTIME_REQUIREMENTS = PROJECT_ROOT / "images" / "containers" / "airflow" / "requirements.txt"
# Airflow settings DTP relies on (the local stack sets the same).
AIRFLOW_OPTIONS = {"core.load_examples": "False", "core.dags_are_paused_at_creation": "True"}
# DTP's DAGs use what airflow.sdk exports from 3.1 on (TriggerRule among them); they are tested on AIRFLOW_VERSION.
MIN_AIRFLOW = (3, 1)
STARTUP_SCRIPT = f"""#!/bin/sh
# MWAA startup script: DTP's recipes, templates, trainer and image definitions ship inside the DAGs folder.
export DTP_INCLUDE_DIR={DAGS_DIR}/include
export DTP_IMAGES_DIR={DAGS_DIR}/images
"""


def package(out: Path, airflow_version: str, python_version: str = "3.11") -> dict[str, Path]:
    """Build the MWAA layout under ``out`` (replaced); the paths of its four parts."""
    if tuple(int(part) for part in airflow_version.split(".")[:2]) < MIN_AIRFLOW:
        raise ValueError(
            f"--airflow-version {airflow_version}: DTP's DAGs need Airflow {'.'.join(map(str, MIN_AIRFLOW))} or "
            f"newer (they are tested on {AIRFLOW_VERSION}); pick such a version MWAA offers"
        )
    if out.exists():
        shutil.rmtree(out)
    dags = out / "dags"
    shutil.copytree(PROJECT_ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT_ROOT / "include", dags / "include", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(PROJECT_ROOT / "images", dags / "images", ignore=shutil.ignore_patterns("airflow"))
    # MWAA parses every .py under the DAGs folder: the trainer's modules are not DAGs; keep them out of parsing.
    (dags / ".airflowignore").write_text("include/\nimages/\n")
    plugins_zip = out / "plugins.zip"
    with zipfile.ZipFile(plugins_zip, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((PROJECT_ROOT / "plugins").rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                archive.write(path, path.relative_to(PROJECT_ROOT / "plugins"))
    constraints = (
        f"https://raw.githubusercontent.com/apache/airflow/constraints-{airflow_version}/"
        f"constraints-{python_version}.txt"
    )
    requirements = out / "requirements.txt"
    requirements.write_text(f'--constraint "{constraints}"\n{RUNTIME_REQUIREMENTS.read_text()}')
    startup = out / "startup.sh"
    startup.write_text(STARTUP_SCRIPT)
    return {"dags": dags, "plugins": plugins_zip, "requirements": requirements, "startup": startup}


@dataclass
class MwaaTarget:
    """Where and how the environment runs (the network stack's private subnets and security group)."""

    name: str
    bucket: str
    execution_role_arn: str
    subnet_ids: list[str]
    security_group_ids: list[str]
    airflow_version: str
    environment_class: str = "mw1.small"
    max_workers: int = 2
    tags: dict[str, str] = field(default_factory=dict)


def upload(parts: dict[str, Path], bucket: str, aws_conn_id: str) -> dict[str, str]:
    """Upload the layout; the S3 object version of each file (MWAA pins plugins, requirements, startup)."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    s3 = S3Hook(aws_conn_id=aws_conn_id)
    if not s3.check_for_bucket(bucket):
        s3.create_bucket(bucket, region_name=s3.conn_region_name)
    s3.conn.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for path in sorted(parts["dags"].rglob("*")):
        if path.is_file():
            s3.load_file(str(path), f"dags/{path.relative_to(parts['dags'])}", bucket, replace=True)
    versions = {}
    for name in ("plugins", "requirements", "startup"):
        key = parts[name].name
        s3.load_file(str(parts[name]), key, bucket, replace=True)
        versions[name] = s3.conn.head_object(Bucket=bucket, Key=key)["VersionId"]
    return versions


def environment_request(target: MwaaTarget, versions: dict[str, str]) -> dict[str, Any]:
    """The CreateEnvironment parameters (``update_request`` derives UpdateEnvironment's from them)."""
    return {
        "Name": target.name,
        "ExecutionRoleArn": target.execution_role_arn,
        "SourceBucketArn": f"arn:aws:s3:::{target.bucket}",
        "DagS3Path": "dags",
        "PluginsS3Path": "plugins.zip",
        "PluginsS3ObjectVersion": versions["plugins"],
        "RequirementsS3Path": "requirements.txt",
        "RequirementsS3ObjectVersion": versions["requirements"],
        "StartupScriptS3Path": "startup.sh",
        "StartupScriptS3ObjectVersion": versions["startup"],
        "NetworkConfiguration": {"SubnetIds": target.subnet_ids, "SecurityGroupIds": target.security_group_ids},
        "AirflowVersion": target.airflow_version,
        "AirflowConfigurationOptions": AIRFLOW_OPTIONS,
        "EnvironmentClass": target.environment_class,
        "MaxWorkers": target.max_workers,
        "WebserverAccessMode": "PRIVATE_ONLY",
        "Tags": target.tags,
    }


def update_request(request: dict[str, Any]) -> dict[str, Any]:
    """UpdateEnvironment's parameters: no tags, and an environment's subnets cannot change (security groups can)."""
    update = {k: v for k, v in request.items() if k not in ("Tags", "KmsKey")}
    update["NetworkConfiguration"] = {"SecurityGroupIds": request["NetworkConfiguration"]["SecurityGroupIds"]}
    return update


def create_or_update(client: Any, request: dict[str, Any]) -> str:
    """CreateEnvironment, or UpdateEnvironment when one of that name exists; the environment's ARN."""
    try:
        client.get_environment(Name=request["Name"])
    except client.exceptions.ResourceNotFoundException:
        return client.create_environment(**request)["Arn"]
    return client.update_environment(**update_request(request))["Arn"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtp.deploy.mwaa", description=__doc__)
    parser.add_argument("action", choices=["package", "deploy"])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "build" / "mwaa")
    parser.add_argument(
        "--airflow-version",
        default=AIRFLOW_VERSION,
        help=f"an Airflow version MWAA offers, 3.1 or newer (default: {AIRFLOW_VERSION}, the one DTP is tested on)",
    )
    parser.add_argument("--name", help="deploy: the environment's name")
    parser.add_argument("--bucket", help="deploy: the source bucket (versioning is turned on)")
    parser.add_argument("--role-arn", help="deploy: the execution role")
    parser.add_argument("--subnets", nargs=2, metavar="SUBNET", help="deploy: two private subnets")
    parser.add_argument("--security-group", help="deploy: the security group")
    parser.add_argument("--aws-conn-id", default="aws_default")
    args = parser.parse_args(argv)
    parts = package(args.out, args.airflow_version)
    print(f"MWAA layout in {args.out}")
    if args.action == "deploy":
        from airflow.providers.amazon.aws.hooks.mwaa import MwaaHook

        missing = [n for n in ("name", "bucket", "role_arn", "subnets", "security_group") if not getattr(args, n)]
        if missing:
            parser.error("deploy needs --" + ", --".join(n.replace("_", "-") for n in missing))
        target = MwaaTarget(
            args.name, args.bucket, args.role_arn, args.subnets, [args.security_group], args.airflow_version
        )
        request = environment_request(target, upload(parts, args.bucket, args.aws_conn_id))
        print(f"Environment {create_or_update(MwaaHook(aws_conn_id=args.aws_conn_id).conn, request)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
