"""include/instance_types.yaml: each accelerator instance type's peak (the MFU's denominator, the throughput gate's
scale) is its vendor's dense bf16 figure for the whole node."""

from __future__ import annotations

import pytest

from dtp.recipes import instance_types

# Dense bf16 FLOP/s of one node, from the vendors' datasheets: 8 x H100 SXM or H200 (989 TFLOPS each), 8 x A100
# (312), 8 x A10G (70: AWS's figure for its part), 16 x Trainium (190) and 16 x Trainium2 (667) chips.
NODE_PEAK_FLOPS = {
    "p5.48xlarge": 8 * 989e12,
    "p5e.48xlarge": 8 * 989e12,
    "p4de.24xlarge": 8 * 312e12,
    "p4d.24xlarge": 8 * 312e12,
    "g5.48xlarge": 8 * 70e12,
    "trn1.32xlarge": 16 * 190e12,
    "trn1n.32xlarge": 16 * 190e12,
    "trn2.48xlarge": 16 * 667e12,
}


@pytest.mark.parametrize(("name", "node_peak"), NODE_PEAK_FLOPS.items())
def test_peak_flops_per_accelerator_make_the_vendors_node_peak(name: str, node_peak: float) -> None:
    instance = instance_types()[name]
    assert instance.peak_flops is not None
    assert instance.peak_flops * instance.accelerators_per_node == pytest.approx(node_peak, rel=1e-3)


def test_every_accelerator_instance_type_has_its_node_peak_checked() -> None:
    accelerated = {name for name, instance in instance_types().items() if instance.accelerator != "cpu"}
    assert accelerated == set(NODE_PEAK_FLOPS)
