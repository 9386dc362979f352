"""Real image builds on the local stack: packer against the EC2 emulator, buildah into the loopback registry."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest

from dtp.form_params import parse_params
from dtp.hooks.ami import AmiHook
from dtp.hooks.image_builder import ContainerBuildError
from dtp.hooks.packer import PackerError, PackerHook
from dtp.hooks.registry import ContainerRegistryHook
from dtp.images import ami, container
from dtp.naming import EXPIRES_TAG, expiry
from dtp.operators.container import ContainerImageBuildOperator
from dtp.operators.packer import PackerBuildOperator
from dtp.params import TrainParams
from dtp.pipeline.spec import run_spec
from dtp.platforms import get_platform

pytestmark = pytest.mark.stack
ANSIBLE_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("family", ami.ami_families())
def test_packer_validates_every_family(family: str) -> None:
    argv = [
        "packer", "validate",
        f"-var-file={ami.VERSIONS_FILE}", f"-var-file={ami.PACKER_DIR / 'families' / f'{family}.pkrvars.hcl'}",
        "-var=ami_name=dtp-validate", f"-var=ansible_playbook={ANSIBLE_BIN / 'ansible-playbook'}", str(ami.TEMPLATE),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("family", ami.ami_families())
def test_playbooks_pass_the_syntax_check(family: str) -> None:
    playbook = ami.PACKER_DIR / "ansible" / f"{family}.yml"
    argv = [str(ANSIBLE_BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,", str(playbook)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_playbooks_and_roles_pass_ansible_lint() -> None:
    done = subprocess.run(
        [str(ANSIBLE_BIN / "ansible-lint"), "--nocolor", "ansible"],
        cwd=ami.PACKER_DIR, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _bake(family: str, tags: dict[str, str], **versions: str) -> dict:
    params = parse_params(ami.AmiBakeParams, {"families": [family], **versions})
    request = ami.bake_requests(params, tags)[0]
    return PackerBuildOperator(task_id="bake", **ami.COMMON_BAKE_ARGUMENTS, **request).execute({})


def test_packer_bakes_an_ami_in_the_emulator_and_finds_it_again(stack, aws) -> None:
    tags = {"dtp:owner": "dtp", "dtp:run": f"it-{uuid.uuid4().hex[:8]}"}
    first = _bake("pcluster-cpu", tags, enroot_version=f"3.5.{uuid.uuid4().int % 10**6}")
    assert first["built"] and first["source"] == "amazon-ebs.emulator"

    ec2 = aws("ec2")
    image = ec2.describe_images(ImageIds=[first["ami_id"]])["Images"][0]
    image_tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert image["Name"] == first["ami_name"] and image["Name"].startswith("dtp-pcluster-cpu-")
    assert image_tags["dtp:run"] == tags["dtp:run"] and image_tags["dtp:family"] == "pcluster-cpu"
    assert image_tags["dtp:enroot"] == first["variables"]["enroot_version"]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    snapshot_tags = {
        t["Key"]: t["Value"] for t in ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["Tags"]
    }
    assert snapshot_tags["dtp:run"] == tags["dtp:run"]
    # The instance packer baked it on carries the builder tags, so the reaper could find it had packer died.
    builder_filter = [
        {"Name": f"tag:{ami.BUILDER_TAG}", "Values": ["true"]},
        {"Name": "tag:dtp:run", "Values": [tags["dtp:run"]]},
    ]
    reservations = ec2.describe_instances(Filters=builder_filter)["Reservations"]
    assert len([i for r in reservations for i in r["Instances"]]) == 1

    count = len(ec2.describe_images(Owners=["self"])["Images"])
    again = _bake("pcluster-cpu", tags, enroot_version=first["variables"]["enroot_version"])
    assert (again["ami_id"], again["built"]) == (first["ami_id"], False)
    assert len(ec2.describe_images(Owners=["self"])["Images"]) == count

    changed = _bake("pcluster-cpu", tags, enroot_version=first["variables"]["enroot_version"] + "1")
    assert changed["built"] and changed["ami_id"] != first["ami_id"] and changed["ami_name"] != first["ami_name"]


def test_packer_tags_the_ami_and_its_snapshot_as_it_makes_them(stack, aws, tmp_path) -> None:
    # The task tags the AMI again once packer is done; a worker that dies before then must still leave an AMI and
    # snapshot the reaper finds by their expiry. Packer alone here, without the operator's tagging.
    tags = {"dtp:owner": "dtp", "dtp:run": f"it-{uuid.uuid4().hex[:8]}", EXPIRES_TAG: expiry(1)}
    params = parse_params(ami.AmiBakeParams, {"families": ["pcluster-cpu"]})
    request = ami.bake_requests(params, tags)[0]
    variables = {
        **request["variables"],
        "ami_name": f"dtp-it-{uuid.uuid4().hex[:12]}",
        ami.COMMON_BAKE_ARGUMENTS["tags_variable"]: json.dumps(tags),
    }
    hook, output = PackerHook(), tmp_path / "packer.log"
    process = hook.start_build(ami.TEMPLATE, Path(request["var_file"]), variables, output)
    (image_id,) = hook.follow(process, output, lambda message: None).amis().values()
    try:
        ec2 = aws("ec2")
        image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
        snapshot_id = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        snapshot = ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]
        assert tags.items() <= {t["Key"]: t["Value"] for t in image["Tags"]}.items()
        assert tags.items() <= {t["Key"]: t["Value"] for t in snapshot["Tags"]}.items()
    finally:
        AmiHook().deregister_image(image_id)


def _build(**conf) -> dict:
    request = parse_params(container.ContainerBuildParams, conf).build_request()
    return ContainerImageBuildOperator(task_id="build", **request).execute({})


def test_buildah_builds_pushes_and_the_registry_holds_the_digest(stack, tmp_path) -> None:
    version = f"1.{uuid.uuid4().hex[:8]}"
    first = _build(build_args={"DTP_TRAINING_VERSION": version})
    registry = ContainerRegistryHook()
    repository, _, tag = first["tag"].removeprefix(f"{stack.registry}/").partition(":")
    assert first["built"] and first["image"] == f"{stack.registry}/dtp/local-cpu@{first['digest']}"
    assert registry.manifest_digest(repository, tag) == first["digest"]
    assert registry.manifest_digest(repository, first["digest"]) == first["digest"]
    with urllib.request.urlopen(f"http://{stack.registry}/v2/{repository}/tags/list") as response:
        assert tag in response.read().decode()

    # The worker keeps no copy of what it pushed: the runs pull it from the registry.
    images = subprocess.run(
        ["buildah", "--storage-driver", "vfs", "images", "--format", "{{.Name}}:{{.Tag}}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert first["tag"] not in images

    again = _build(build_args={"DTP_TRAINING_VERSION": version})
    assert (again["digest"], again["built"]) == (first["digest"], False)
    changed = _build(build_args={"DTP_TRAINING_VERSION": version + "b"})
    assert changed["built"] and changed["digest"] != first["digest"]

    rootfs = registry.unpack(first["image"], tmp_path / "rootfs")
    shipped = rootfs / "opt" / "dtp" / "training" / "train.py"
    assert shipped.read_text() == (ami.IMAGES_DIR.parent / "include" / "training" / "train.py").read_text()
    assert registry.unpack(first["image"], tmp_path / "rootfs") == rootfs
    assert [p.name for p in tmp_path.iterdir()] == ["rootfs"]  # no half-unpacked tree left beside it


def test_a_failing_bake_says_why(stack) -> None:
    params = parse_params(ami.AmiBakeParams, {"families": ["pcluster-cpu"]})
    request = ami.bake_requests(params, {"dtp:owner": "dtp"})[0]
    request["variables"] = {**request["variables"], "emulator_source_ami_name": f"no-such-ami-{uuid.uuid4().hex[:6]}-*"}
    with pytest.raises(PackerError, match="No AMI was found matching filters"):
        PackerBuildOperator(task_id="bake", **ami.COMMON_BAKE_ARGUMENTS, **request).execute({})


def test_unpacking_an_image_the_registry_lacks_names_it(stack, tmp_path) -> None:
    missing = f"{stack.registry}/dtp/local-cpu@sha256:{'0' * 64}"
    with pytest.raises(ContainerBuildError, match=r"cannot fetch .*sha256:0{64}"):
        ContainerRegistryHook().unpack(missing, tmp_path / "rootfs")
    assert list(tmp_path.iterdir()) == []


def test_a_run_reads_the_image_its_instance_types_accelerator_runs(stack, aws) -> None:
    # EKS offers GPU and Trainium nodes: the Neuron image is published beside the CUDA one, not over it.
    ssm = aws("ssm")
    published = {
        "training": f"registry.invalid/dtp/training@sha256:{'a' * 64}",
        "neuron": f"registry.invalid/dtp/neuron@sha256:{'b' * 64}",
    }
    parameters = {image: container.training_parameter("eks", image) for image in published}
    assert len(set(parameters.values())) == 2
    for image, reference in published.items():
        ssm.put_parameter(Name=parameters[image], Value=reference, Type="String", Overwrite=True)
    try:
        for instance_type, image in (("p5.48xlarge", "training"), ("trn1.32xlarge", "neuron")):
            params = parse_params(TrainParams, {"platform": "eks", "instance_type": instance_type})
            spec = run_spec(params, "train_e2e", "manual__1")
            assert container.resolve_runtime(get_platform("eks"), spec, "aws_default")["image"] == published[image]
    finally:
        for name in parameters.values():
            ssm.delete_parameter(Name=name)
