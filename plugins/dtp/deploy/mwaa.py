"""Package DTP for Amazon MWAA, upload it, and create or update the environment.

``python -m dtp.deploy.mwaa package`` builds MWAA's layout in a folder:

    dags/                 the DAG files, with include/ (recipes, templates, trainer) under dags/include/
                          and images/packer + the training Dockerfiles under dags/images/
    plugins.zip           plugins/ (the dtp package and the plugin that registers its extra links), less the local
                          stack and this deploy tool (dtp.local, dtp.deploy), which run where the operator works
    requirements.txt      DTP's runtime dependencies, unpinned: Airflow's constraints for the environment's Airflow
                          and Python versions choose their versions
    startup.sh            exports DTP_INCLUDE_DIR and DTP_IMAGES_DIR so dtp finds them inside the DAGs folder

``package`` replaces only a folder an earlier ``package`` made (it holds ``.dtp-mwaa-package``) or an empty one.

``deploy`` checks its inputs against CreateEnvironment's rules before any AWS call, then uploads the layout to a
versioned S3 bucket (created and tagged when missing; what the previous upload put under dags/ that this layout
lacks is deleted, by its manifest) and calls CreateEnvironment, or UpdateEnvironment when the environment exists,
through the amazon provider's MwaaHook, with the object versions MWAA needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow import __version__ as AIRFLOW_VERSION
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from dtp.local.config import PROJECT_ROOT
from dtp.naming import OWNER, PASSED_ROLE_PREFIX, TAG_PREFIX, aws_tags, passed_role_problem

log = logging.getLogger(__name__)

DAGS_DIR = "/usr/local/airflow/dags"  # where MWAA syncs DagS3Path
# Packages of plugins/ that run on the operator's machine, never in the environment.
OPERATOR_SIDE = {("dtp", "local"), ("dtp", "deploy")}
RUNTIME_REQUIREMENTS = PROJECT_ROOT / "images" / "containers" / "airflow" / "requirements.txt"
# Airflow settings DTP relies on (the local stack sets the same).
AIRFLOW_OPTIONS = {"core.load_examples": "False", "core.dags_are_paused_at_creation": "True"}
# DTP's DAGs use what airflow.sdk exports from 3.1 on (TriggerRule among them); they are tested on AIRFLOW_VERSION.
MIN_AIRFLOW = (3, 1)
AIRFLOW_RELEASE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
# The Python of the environment (MWAA's page of Airflow versions gives each one's): it picks Airflow's constraints file.
PYTHON_VERSION = "3.11"
PYTHON_RELEASE = re.compile(r"3\.[0-9]+")
# The file that marks a folder as made by ``package``: the only kind of non-empty folder ``package`` replaces.
PACKAGE_MARKER = ".dtp-mwaa-package"
# Beside dags/ in the bucket: the keys an upload put there, so the next one deletes only what DTP put there.
UPLOAD_MANIFEST = "dtp-mwaa-dags.json"
# CreateEnvironment's rules (botocore's mwaa service model); subnet and security group ids as EC2 issues them.
ENVIRONMENT_NAME = re.compile(r"[a-zA-Z][0-9a-zA-Z_-]{0,79}")
EXECUTION_ROLE_ARN = re.compile(r"arn:aws(-[a-z]+)?:iam::[0-9]{12}:role/?[a-zA-Z_0-9+=,.@/-]+")
SUBNET_ID = re.compile(r"subnet-[0-9a-f]{8,17}")
SECURITY_GROUP_ID = re.compile(r"sg-[0-9a-f]{8,17}")
# S3's general purpose bucket naming rules.
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
IP_ADDRESS = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
RESERVED_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
RESERVED_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# Tags of the source bucket DTP creates and of the environment: DTP's, and not a run's (the reaper leaves them).
MWAA_TAGS = {f"{TAG_PREFIX}owner": OWNER, f"{TAG_PREFIX}role": "mwaa"}
STARTUP_SCRIPT = f"""#!/bin/sh
# MWAA startup script: DTP's recipes, templates, trainer and image definitions ship inside the DAGs folder.
export DTP_INCLUDE_DIR={DAGS_DIR}/include
export DTP_IMAGES_DIR={DAGS_DIR}/images
"""


def airflow_version_problem(version: str) -> str | None:
    """Why ``version`` cannot be the environment's Airflow (not a release number, or older than the DAGs need)."""
    if not AIRFLOW_RELEASE.fullmatch(version):
        return f"--airflow-version {version!r}: must be an Airflow release, MAJOR.MINOR.PATCH (e.g. {AIRFLOW_VERSION})"
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_AIRFLOW:
        return (
            f"--airflow-version {version}: DTP's DAGs need Airflow {'.'.join(map(str, MIN_AIRFLOW))} or "
            f"newer (they are tested on {AIRFLOW_VERSION}); pick such a version MWAA offers"
        )
    return None


def python_version_problem(version: str) -> str | None:
    """Why ``version`` cannot name the environment's Python (it goes into requirements.txt's constraints URL)."""
    if not PYTHON_RELEASE.fullmatch(version):
        return f"--python-version {version!r}: must be a Python 3 version, 3.MINOR (e.g. {PYTHON_VERSION})"
    return None


def out_problem(out: Path) -> str | None:
    """Why ``package`` may not replace ``out``: only a folder an earlier package made, or an empty one, is its own."""
    folder = out.resolve()
    if PROJECT_ROOT.is_relative_to(folder):
        return f"--out {out}: it holds the project ({PROJECT_ROOT}); choose a folder of its own, e.g. build/mwaa"
    if folder.exists() and not folder.is_dir():
        return f"--out {out}: {folder} is not a folder"
    if folder.is_dir() and any(folder.iterdir()) and not (folder / PACKAGE_MARKER).is_file():
        return (
            f"--out {out}: {folder} is not empty and no earlier package made it (it has no {PACKAGE_MARKER}); "
            "choose a new or empty folder, or delete this one yourself"
        )
    return None


def check_package_inputs(out: Path, airflow_version: str, python_version: str) -> None:
    """Raise ``ValueError`` when ``airflow_version``, ``python_version`` or ``out`` cannot be packaged for."""
    problem = airflow_version_problem(airflow_version) or python_version_problem(python_version) or out_problem(out)
    if problem:
        raise ValueError(problem)


def unpinned_requirements(path: Path) -> list[str]:
    """The requirements of ``path`` without their versions (extras and markers kept).

    DTP's pins suit its own constraints.txt and Airflow; the environment's Airflow may be another, whose constraints
    file pins the providers, boto3 and celery differently, and pip refuses a requirement its constraints contradict.
    Unpinned, every package Airflow's constraints name gets the version they name, and the rest their newest.
    """
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    requirements = [Requirement(line) for line in lines if line]
    for requirement in requirements:
        requirement.specifier = SpecifierSet()
    return [str(requirement) for requirement in requirements]


def package(out: Path, airflow_version: str, python_version: str = PYTHON_VERSION) -> dict[str, Path]:
    """Build the MWAA layout under ``out`` (replacing an earlier package there); the paths of its four parts."""
    check_package_inputs(out, airflow_version, python_version)
    out = out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / PACKAGE_MARKER).write_text("Made by python -m dtp.deploy.mwaa package, which replaces this folder.\n")
    dags = out / "dags"
    shutil.copytree(PROJECT_ROOT / "dags", dags, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT_ROOT / "include", dags / "include", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copytree(PROJECT_ROOT / "images", dags / "images", ignore=shutil.ignore_patterns("airflow"))
    # MWAA parses every .py under the DAGs folder: the trainer's modules are not DAGs; keep them out of parsing.
    (dags / ".airflowignore").write_text("include/\nimages/\n")
    plugins_zip = out / "plugins.zip"
    with zipfile.ZipFile(plugins_zip, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted((PROJECT_ROOT / "plugins").rglob("*")):
            relative = path.relative_to(PROJECT_ROOT / "plugins")
            if path.is_file() and "__pycache__" not in path.parts and relative.parts[:2] not in OPERATOR_SIDE:
                archive.write(path, relative)
    constraints = (
        f"https://raw.githubusercontent.com/apache/airflow/constraints-{airflow_version}/"
        f"constraints-{python_version}.txt"
    )
    requirements = out / "requirements.txt"
    requirements.write_text(
        "\n".join([f'--constraint "{constraints}"', *unpinned_requirements(RUNTIME_REQUIREMENTS)]) + "\n"
    )
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
    tags: dict[str, str] = field(default_factory=lambda: dict(MWAA_TAGS))


def bucket_problem(bucket: str) -> str | None:
    """Why S3 would refuse ``bucket`` as a bucket name."""
    if not BUCKET_NAME.fullmatch(bucket):
        return (
            f"--bucket {bucket!r}: must be 3-63 lowercase letters, digits, dots and hyphens, "
            "starting and ending with a letter or digit"
        )
    if ".." in bucket or IP_ADDRESS.fullmatch(bucket):
        return f"--bucket {bucket!r}: must not hold two adjacent dots or look like an IP address"
    if bucket.startswith(RESERVED_BUCKET_PREFIXES) or bucket.endswith(RESERVED_BUCKET_SUFFIXES):
        return (
            f"--bucket {bucket!r}: S3 reserves the prefixes {', '.join(RESERVED_BUCKET_PREFIXES)} "
            f"and the suffixes {', '.join(RESERVED_BUCKET_SUFFIXES)}"
        )
    return None


def target_problems(target: MwaaTarget) -> list[str]:
    """What CreateEnvironment or S3 would refuse in ``target``, each with its option, value and rule."""
    checks = [
        ("--name", target.name, ENVIRONMENT_NAME, "1-80 letters, digits, - and _, starting with a letter"),
        (
            "--role-arn",
            target.execution_role_arn,
            EXECUTION_ROLE_ARN,
            "an IAM role ARN, arn:aws:iam::<account>:role/<name>",
        ),
    ]
    checks += [("--subnets", s, SUBNET_ID, "a subnet id, subnet-<8 to 17 hex digits>") for s in target.subnet_ids]
    checks += [
        ("--security-group", group, SECURITY_GROUP_ID, "a security group id, sg-<8 to 17 hex digits>")
        for group in target.security_group_ids
    ]
    problems = [
        f"{option} {value!r}: must be {rule}" for option, value, pattern, rule in checks if not pattern.fullmatch(value)
    ]
    role = target.execution_role_arn
    if EXECUTION_ROLE_ARN.fullmatch(role) and (problem := passed_role_problem(role)):
        problems.append(
            f"--role-arn {role!r}: the role's name {problem}: "
            f"dtp-mwaa-deploy-policy.json lets the deploy pass only {PASSED_ROLE_PREFIX}* roles to MWAA"
        )
    if len(set(target.subnet_ids)) != 2:
        problems.append(f"--subnets {target.subnet_ids}: MWAA needs two different subnets (in two availability zones)")
    if not 1 <= len(target.security_group_ids) <= 5:
        problems.append(f"security groups {target.security_group_ids}: MWAA takes 1 to 5")
    problems += [p for p in (bucket_problem(target.bucket), airflow_version_problem(target.airflow_version)) if p]
    return problems


def upload(parts: dict[str, Path], bucket: str, aws_conn_id: str) -> dict[str, str]:
    """Upload the layout, then delete what the previous upload put under dags/ that this one lacks (a removed DAG or
    recipe would keep loading), by the manifest each upload leaves (``UPLOAD_MANIFEST``): files DTP never uploaded
    are left alone; the S3 object version of each file (MWAA pins plugins, requirements, startup). A bucket another
    account owns is refused (``owned_bucket_exists``): that account could change what the environment runs."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from dtp.pipeline.results import owned_bucket_exists

    s3 = S3Hook(aws_conn_id=aws_conn_id)
    account = s3.account_id
    if not owned_bucket_exists(s3, bucket, account):
        s3.create_bucket(bucket, region_name=s3.conn_region_name)
        s3.conn.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": aws_tags(MWAA_TAGS)})
    s3.conn.put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}, ExpectedBucketOwner=account
    )
    dag_keys = []
    for path in sorted(parts["dags"].rglob("*")):
        if path.is_file():
            key = f"dags/{path.relative_to(parts['dags'])}"
            s3.load_file(str(path), key, bucket, replace=True)
            dag_keys.append(key)
    delete_earlier_dag_keys(s3, bucket, dag_keys)
    s3.load_string(json.dumps(dag_keys, indent=1), UPLOAD_MANIFEST, bucket, replace=True)
    versions = {}
    for name in ("plugins", "requirements", "startup"):
        key = parts[name].name
        s3.load_file(str(parts[name]), key, bucket, replace=True)
        versions[name] = s3.conn.head_object(Bucket=bucket, Key=key, ExpectedBucketOwner=account)["VersionId"]
    return versions


def delete_earlier_dag_keys(s3: Any, bucket: str, dag_keys: list[str]) -> None:
    """Delete, through the ``S3Hook`` ``s3``, the keys the previous upload's manifest lists that ``dag_keys`` lacks:
    files of an earlier layout, which MWAA would keep loading."""
    earlier = json.loads(s3.read_key(UPLOAD_MANIFEST, bucket)) if s3.check_for_key(UPLOAD_MANIFEST, bucket) else []
    gone = sorted(set(earlier) - set(dag_keys))
    for key in gone:
        log.info("Deleting s3://%s/%s: the previous upload's, not in this one", bucket, key)
    if gone:
        s3.delete_objects(bucket, gone)


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


def deploy_target(parser: argparse.ArgumentParser, args: argparse.Namespace) -> MwaaTarget:
    """The environment ``deploy`` targets; a usage error when an option is missing, ``ValueError`` when invalid."""
    missing = [n for n in ("name", "bucket", "role_arn", "subnets", "security_group") if not getattr(args, n)]
    if missing:
        parser.error("deploy needs --" + ", --".join(n.replace("_", "-") for n in missing))
    target = MwaaTarget(
        args.name, args.bucket, args.role_arn, args.subnets, [args.security_group], args.airflow_version
    )
    problems = target_problems(target)
    if problems:
        raise ValueError("cannot deploy to MWAA:\n" + "\n".join(problems))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtp.deploy.mwaa", description=__doc__)
    parser.add_argument("action", choices=["package", "deploy"])
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "build" / "mwaa",
        help=f"the layout's folder: new, empty, or an earlier package's (it holds {PACKAGE_MARKER})",
    )
    parser.add_argument(
        "--airflow-version",
        default=AIRFLOW_VERSION,
        help=f"an Airflow version MWAA offers, 3.1 or newer (default: {AIRFLOW_VERSION}, the one DTP is tested on)",
    )
    parser.add_argument(
        "--python-version",
        default=PYTHON_VERSION,
        help=f"the Python MWAA runs that Airflow version on; it picks Airflow's constraints (default {PYTHON_VERSION})",
    )
    parser.add_argument("--name", help="deploy: the environment's name")
    parser.add_argument("--bucket", help="deploy: the source bucket (versioning is turned on)")
    parser.add_argument("--role-arn", help="deploy: the execution role")
    parser.add_argument("--subnets", nargs=2, metavar="SUBNET", help="deploy: two private subnets")
    parser.add_argument("--security-group", help="deploy: the security group")
    parser.add_argument("--aws-conn-id", default="aws_default")
    args = parser.parse_args(argv)
    try:  # every input is checked before any file is replaced or any AWS call is made
        target = deploy_target(parser, args) if args.action == "deploy" else None
        check_package_inputs(args.out, args.airflow_version, args.python_version)
    except ValueError as err:
        parser.error(str(err))
    parts = package(args.out, args.airflow_version, args.python_version)
    print(f"MWAA layout in {args.out}")
    if target is not None:
        from airflow.providers.amazon.aws.hooks.mwaa import MwaaHook

        request = environment_request(target, upload(parts, target.bucket, args.aws_conn_id))
        print(f"Environment {create_or_update(MwaaHook(aws_conn_id=args.aws_conn_id).conn, request)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
