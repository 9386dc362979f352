"""dtp.metrics.trace: a profiled window's time by kind of work, from torch.profiler's Chrome trace."""

from __future__ import annotations

import pytest

from dtp.metrics.trace import kind_of, summarize_trace


def op(name: str, ts: float, dur: float, cat: str = "cpu_op", tid: int = 1) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur}


def test_host_operators_count_their_own_time_once_and_threads_overlap() -> None:
    trace = {
        "traceEvents": [
            op("aten::linear", 0, 100),
            op("aten::addmm", 10, 50),  # inside aten::linear
            op("aten::t", 60, 10),  # inside aten::linear, after aten::addmm
            op("gloo:all_reduce", 50, 100, cat="user_annotation", tid=2),  # the communication thread
            {"ph": "M", "name": "process_name", "pid": 7},
        ]
    }
    summary = summarize_trace(trace)
    assert summary["source"] == "host operators"
    assert summary["by_kind_ms"] == {"communication": 0.1, "other": 0.05, "matmul": 0.05}
    assert summary["top_ms"] == {"gloo:all_reduce": 0.1, "aten::addmm": 0.05, "aten::linear": 0.04, "aten::t": 0.01}
    assert (summary["span_ms"], summary["busy_ms"], summary["idle_share"]) == (0.15, 0.15, 0.0)


def test_device_kernels_are_the_work_on_a_gpu_and_gaps_between_them_are_idle() -> None:
    trace = {
        "traceEvents": [
            op("aten::mm", 0, 500),  # host side: not the device's work when kernels are traced
            op("sm90_xmma_gemm_bf16bf16_bf16f32", 0, 50, cat="kernel"),
            op("flash_fwd_kernel", 60, 20, cat="kernel"),
            op("ncclDevKernel_AllGather_RING_LL", 40, 60, cat="kernel", tid=9),  # another stream, overlapping
            op("vectorized_elementwise_kernel", 110, 10, cat="kernel"),
            op("Memcpy HtoD (Pageable -> Device)", 100, 5, cat="gpu_memcpy"),
        ]
    }
    summary = summarize_trace(trace)
    assert summary["source"] == "device kernels"
    assert summary["by_kind_ms"] == {
        "communication": 0.06,
        "matmul": 0.05,
        "attention": 0.02,
        "other": 0.01,
        "memory": 0.005,
    }
    assert (summary["span_ms"], summary["busy_ms"]) == (0.12, 0.115)
    assert summary["idle_share"] == pytest.approx(0.005 / 0.12, abs=1e-4)
    assert sum(summary["by_kind_share"].values()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("FSDP::all_gather (layers.0)", "communication"),
        ("FSDP::post_backward_reduce (layers.3)", "communication"),
        ("_c10d_functional::wait_tensor", "communication"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", "attention"),
        ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("multi_tensor_apply_kernel", "optimizer"),
        ("aten::_foreach_lerp_", "optimizer"),
        ("aten::copy_", "memory"),
        ("triton_poi_fused_mul_silu_0", "other"),
    ],
)
def test_kinds_by_name(name: str, kind: str) -> None:
    assert kind_of(name) == kind


def test_a_trace_without_work_is_an_error() -> None:
    with pytest.raises(ValueError, match="no kernel or operator events"):
        summarize_trace({"traceEvents": [{"ph": "M", "name": "process_name"}]})
