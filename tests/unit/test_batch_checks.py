"""What the Batch platform's ``check`` refuses before anything exists: a job without the launch template that gives
its hosts ``/fsx`` (refused at validate_params too), what Batch's model or names refuse, and node ranges that do not
cover the job's nodes exactly once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from batch_support import NETWORK, documents_of, requests, spec_for, use_settings

from dtp.form_params import ParamsError
from dtp.naming import RunNames
from dtp.pipeline.spec import build_spec
from dtp.platforms.base import PlatformNotReady
from dtp.platforms.batch import BatchPlatform


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    return use_settings(monkeypatch)


@pytest.mark.parametrize(
    ("conf", "needs"),
    [
        (
            {"num_nodes": 1},
            "the job maps 32 EFA devices (/dev/infiniband/uverbs*) and runs on 1 node, which shares the run's files",
        ),
        ({"recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 2}, "the job runs on 2 nodes, which share"),
        ({"num_nodes": 2}, "the job maps 32 EFA devices (/dev/infiniband/uverbs*) and runs on 2 nodes, which share"),
        # Its /fsx would be an empty folder of the host's disk: no config to read, its results and checkpoints lost.
        ({"recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": 1}, "the job runs on 1 node, which shares"),
    ],
)
def test_without_a_launch_template_every_job_is_refused_before_anything_exists(
    settings, monkeypatch, conf, needs
) -> None:
    """Without the launch template the hosts get no /fsx, through which the Airflow workers and the job's nodes
    share the run's files, and no EFA interfaces (the container's devices do not exist): the run is refused at
    validate_params and provision creates nothing."""
    settings(launch_template_id="")
    platform = BatchPlatform()
    problems = platform.check(platform.render(spec_for(**conf), NETWORK))
    assert len(problems) == 1 and problems[0].startswith(
        "compute-environment.json: no launchTemplate (connection 'dtp_batch' gives no launch_template_id), but "
    )
    assert needs in problems[0]
    assert (
        "the run's files (config, programs, results, checkpoints) with the Airflow workers through /fsx"
        in (problems[0])
    )
    assert problems[0].endswith("user data that mounts the FSx for Lustre file system at /fsx")
    efa = "one network interface of InterfaceType efa on each network card 0..31, whose Groups hold the run's EFA"
    assert (efa in problems[0]) == ("EFA devices" in needs)

    monkeypatch.setattr(BatchPlatform, "client", property(lambda _: pytest.fail("provision called Batch")))
    with pytest.raises(PlatformNotReady, match=r"the Batch requests are invalid:\ncompute-environment.json: no"):
        platform.provision(spec_for(**conf), NETWORK)


@pytest.mark.parametrize("num_nodes", [1, 2])
def test_validate_params_refuses_a_run_without_a_launch_template(settings, num_nodes) -> None:
    settings(launch_template_id="")
    conf = {"platform": "batch", "recipe": "tiny", "instance_type": "m5.2xlarge", "num_nodes": num_nodes}
    with pytest.raises(ParamsError) as info:
        build_spec({}, conf, RunNames("train_e2e", "manual__1"))
    assert "platform: 'batch' would be refused its cluster:" in str(info.value)
    assert "no launchTemplate (connection 'dtp_batch' gives no launch_template_id)" in str(info.value)


def test_check_names_what_batch_would_refuse(settings) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    environment["computeEnvironmentName"] = "my compute environment"
    environment["computeResources"]["type"] = "EC3"
    environment["computeResources"]["Bogus"] = True
    queue["computeEnvironmentOrder"][0]["computeEnvironment"] = "someone-elses-ce"
    definition["type"] = "parallel"
    definition["nodeProperties"]["numNodes"] = 0
    problems = "\n".join(platform.check(documents_of(environment, queue, definition)))
    assert "CreateComputeEnvironment.computeEnvironmentName: 'my compute environment' is not a Batch name" in problems
    assert "CreateComputeEnvironment.computeResources.type: 'EC3' is not one of the allowed values" in problems
    assert 'Unknown parameter in computeResources: "Bogus"' in problems
    assert "computeEnvironmentOrder names 'someone-elses-ce', not the run's compute environment" in problems
    assert "RegisterJobDefinition.type: 'parallel' is not one of the allowed values" in problems
    assert "nodeProperties.numNodes: 0; a job needs at least 1 node" in problems


@pytest.mark.parametrize(
    ("nodes", "problem"),
    [
        ({"mainNode": 2}, "nodeProperties.mainNode: 2 is not one of the job's nodes 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:0"}]}, "the ranges cover nodes [0], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "0:"}, {"targetNodes": "1"}]}, "cover nodes [0, 1, 1], not 0..1"),
        ({"nodeRangeProperties": [{"targetNodes": "a:b"}]}, "targetNodes: not a range like '0:' or '1:3'"),
    ],
)
def test_check_refuses_node_ranges_that_do_not_cover_the_job(settings, nodes, problem) -> None:
    platform = BatchPlatform()
    environment, queue, definition = requests(platform.render(spec_for(num_nodes=2), NETWORK))
    container = definition["nodeProperties"]["nodeRangeProperties"][0]["container"]
    ranges = [{**r, "container": container} for r in nodes.pop("nodeRangeProperties", [])]
    definition["nodeProperties"] |= nodes | ({"nodeRangeProperties": ranges} if ranges else {})
    assert any(problem in p for p in platform.check(documents_of(environment, queue, definition)))
