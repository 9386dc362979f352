"""Framework log parsers against sample logs in each framework's printed format (tests/unit/data/framework_logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtp.metrics.framework_logs import summarize_log

LOGS = Path(__file__).parent / "data" / "framework_logs"


def _lines(name: str) -> list[str]:
    return (LOGS / name).read_text().splitlines()


def test_torchtitan_tps_is_per_device_and_colour_codes_are_ignored() -> None:
    summary = summarize_log("torchtitan", _lines("torchtitan_llama3_8b.log"), seq_len=8192, world_size=16)
    assert summary.steps == [1, 10, 20, 30]  # step 20's line is coloured
    assert summary.losses == [12.2371, 9.8734, 8.1165, 7.4020]
    assert summary.tokens_per_s == [1102 * 16, 6841 * 16, 6902 * 16, 6880 * 16]
    assert summary.median_tokens_per_s == 6880 * 16  # the first, warm-up window left out
    assert summary.max_memory_mb == pytest.approx(48.90 * 1024)
    assert summary.mfu == pytest.approx(0.4029)


def test_megatron_tokens_per_s_from_batch_sequence_and_iteration_time() -> None:
    summary = summarize_log("megatron-lm", _lines("megatron_llama3_8b.log"), seq_len=8192, world_size=16)
    assert summary.steps == [1, 10, 20, 40]  # iteration 30 only skipped steps: no loss
    assert summary.losses == [12.1644, 9.902115, 8.230771, 7.11832]
    assert summary.tokens_per_s[1] == pytest.approx(128 * 8192 / 7.8125)
    assert summary.final_loss < summary.first_loss


def test_neuronx_throughput_is_sequences_per_second() -> None:
    summary = summarize_log("neuronx-distributed", _lines("neuronx_llama3_8b.log"), seq_len=8192, world_size=32)
    assert summary.steps == [1, 2, 3, 4]
    assert summary.losses == [12.0313, 11.9844, 11.625, 11.1406]
    assert summary.tokens_per_s[1] == pytest.approx(10.67 * 8192)


def test_picotron_tokens_per_s_is_for_the_job_with_readable_suffixes() -> None:
    summary = summarize_log("picotron", _lines("picotron_llama3_2_1b.log"), seq_len=4096, world_size=16)
    assert summary.steps == [1, 2, 3, 4, 5, 6]  # "Tokens per step: 131.07K" is not a step line
    assert summary.losses == [11.9312, 11.2040, 10.3177, 9.6021, 8.9410, 8.4405]
    assert summary.tokens_per_s[:2] == [pytest.approx(45.04e3), pytest.approx(319.69e3)]
    assert summary.max_memory_mb == pytest.approx(41.20e9 / 2**20)
    assert summary.mfu == pytest.approx(0.2342, abs=0.01)


def test_nemo_steps_count_from_one_and_tokens_come_from_batch_and_step_time() -> None:
    summary = summarize_log("nemo", _lines("nemo_llama3_8b.log"), seq_len=8192, world_size=16)
    assert summary.steps == [1, 2, 3, 4, 5]  # iterations 0-4; the checkpoint line in between is not a step
    assert summary.losses == [12.03, 11.98, 11.41, 10.87, 10.22]
    assert summary.tokens_per_s[2] == pytest.approx(8 * 8192 / 0.3842)


def test_the_trainer_metrics_file_goes_through_the_same_entry_point() -> None:
    lines = [
        '{"event": "start", "params": 10, "world_size": 2}',
        '{"event": "step", "step": 1, "loss": 3.0, "tokens_per_s": 5.0}',
    ]
    summary = summarize_log("fsdp", lines, seq_len=128, world_size=2)
    assert summary.steps == [1] and summary.params == 10


def test_a_log_of_another_framework_yields_no_steps() -> None:
    assert summarize_log("megatron-lm", _lines("torchtitan_llama3_8b.log"), seq_len=8192, world_size=16).steps == []
    assert summarize_log("torchtitan", _lines("neuronx_llama3_8b.log"), seq_len=8192, world_size=16).steps == []


def test_a_framework_without_a_parser_is_named() -> None:
    with pytest.raises(ValueError, match="no log parser for framework 'jax'"):
        summarize_log("jax", [], seq_len=8192, world_size=16)


def test_older_torchtitan_lines_without_grad_norm_or_tflops_and_srun_prefixes() -> None:
    # The format of torchtitan releases before grad_norm/tflops were logged, behind `srun -l`'s rank prefix;
    # every rank prints the line, so a step appears several times and counts once.
    line = (
        "{rank}: 2026-11-30 09:00:00,000 - root - INFO - "
        "step: {step}  loss:  {loss}  memory: 60.00GiB(75.00%)  tps: 5,000  mfu: 30.00%"
    )
    steps = ((10, "4.5000"), (20, "4.0000"))
    lines = [line.format(rank=rank, step=step, loss=loss) for step, loss in steps for rank in (0, 1)]
    summary = summarize_log("torchtitan", lines, seq_len=8192, world_size=32)
    assert summary.steps == [10, 20] and summary.losses == [4.5, 4.0]
    assert summary.tokens_per_s == [5000 * 32, 5000 * 32] and summary.mfu == pytest.approx(0.30)
