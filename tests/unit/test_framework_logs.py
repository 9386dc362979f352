"""Framework log parsers against sample logs in each framework's printed format (tests/unit/data/framework_logs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtp.metrics import flops
from dtp.metrics.framework_logs import summarize_log, torchtitan_records
from model import MODELS, flops_per_token

LOGS = Path(__file__).parent / "data" / "framework_logs"


def _lines(name: str) -> list[str]:
    return (LOGS / name).read_text().splitlines()


def test_torchtitan_tps_is_per_device_and_colour_codes_are_ignored() -> None:
    lines = _lines("torchtitan_llama3_8b.log")
    summary = summarize_log("torchtitan", lines, seq_len=8192, world_size=16, model="llama3_1_8b", peak_flops=989e12)
    assert summary.steps == [1, 10, 20, 30]  # step 20's line is coloured
    assert summary.losses == [12.2371, 9.8734, 8.1165, 7.4020]
    assert summary.tokens_per_s == [1102 * 16, 6841 * 16, 6902 * 16, 6880 * 16]
    assert summary.median_tokens_per_s == 6880 * 16  # the first, warm-up window left out
    assert summary.max_memory_mb == pytest.approx(48.90 * 1024)
    # DTP's accounting is torchtitan's: the MFU the log prints on an H100 (989e12 FLOP/s, as torchtitan takes it).
    assert summary.mfu == pytest.approx(0.4029, abs=1e-4)


def test_megatron_tokens_per_s_from_batch_sequence_and_iteration_time() -> None:
    summary = summarize_log("megatron-lm", _lines("megatron_llama3_8b.log"), seq_len=8192, world_size=16)
    assert summary.steps == [1, 10, 20, 40]  # iteration 30 only skipped steps: no loss
    assert summary.losses == [12.1644, 9.902115, 8.230771, 7.11832]
    assert summary.tokens_per_s[1] == pytest.approx(128 * 8192 / 7.8125)
    assert (summary.first_loss, summary.final_loss) == (12.1644, 7.11832)


def test_neuronx_throughput_is_sequences_per_second() -> None:
    summary = summarize_log("neuronx-distributed", _lines("neuronx_llama3_8b.log"), seq_len=8192, world_size=32)
    assert summary.steps == [1, 2, 3, 4]
    assert summary.losses == [12.0313, 11.9844, 11.625, 11.1406]
    assert summary.tokens_per_s[1] == pytest.approx(10.67 * 8192)


def test_picotron_tokens_per_s_is_for_the_job_with_readable_suffixes() -> None:
    lines = _lines("picotron_llama3_2_1b.log")
    summary = summarize_log("picotron", lines, seq_len=4096, world_size=16)
    assert summary.steps == [1, 2, 3, 4, 5, 6]  # "Tokens per step: 131.07K" is not a step line
    assert summary.losses == [11.9312, 11.2040, 10.3177, 9.6021, 8.9410, 8.4405]
    assert summary.tokens_per_s[:2] == [pytest.approx(45.04e3), pytest.approx(319.69e3)]
    assert summary.max_memory_mb == pytest.approx(41.20e9 / 2**20)


@pytest.mark.parametrize(
    ("framework", "log", "model", "seq_len", "peak_flops"),
    [
        # picotron's own MFU counts the token embedding too, against an H100's peak whatever the GPU.
        ("picotron", "picotron_llama3_2_1b.log", "llama3_2_1b", 4096, 312e12),
        ("megatron-lm", "megatron_llama3_8b.log", "llama3_1_8b", 8192, 989e12),
    ],
    ids=["picotron", "megatron-lm"],
)
def test_a_framework_runs_mfu_is_taken_by_the_trainers_accounting_not_its_own(
    framework: str, log: str, model: str, seq_len: int, peak_flops: float
) -> None:
    summary = summarize_log(framework, _lines(log), seq_len=seq_len, world_size=16, model=model, peak_flops=peak_flops)
    tokens_per_s = summary.median_tokens_per_s
    assert tokens_per_s is not None
    assert summary.mfu == pytest.approx(flops_per_token(MODELS[model], seq_len) * tokens_per_s / 16 / peak_flops)


@pytest.mark.parametrize(("model", "peak_flops"), [(None, 989e12), ("llama3_1_8b", None)])
def test_a_framework_run_has_no_mfu_without_its_model_and_peak(model: str | None, peak_flops: float | None) -> None:
    # torchtitan's log prints an MFU, by its own peak: not the one DTP counts against.
    lines = _lines("torchtitan_llama3_8b.log")
    summary = summarize_log("torchtitan", lines, seq_len=8192, world_size=16, model=model, peak_flops=peak_flops)
    assert summary.mfu is None


def test_the_trainers_metrics_keep_its_own_mfu() -> None:
    lines = ['{"event": "step", "step": 1, "loss": 3.0, "tokens_per_s": 5.0, "mfu": 0.5}']
    summary = summarize_log("fsdp", lines, seq_len=128, world_size=2, model="tiny", peak_flops=989e12)
    assert summary.mfu == 0.5


@pytest.mark.parametrize("model", sorted(MODELS))
def test_the_flops_per_token_are_the_trainers(model: str) -> None:
    for seq_len in (128, 8192):
        assert flops.flops_per_token(model, seq_len) == flops_per_token(MODELS[model], seq_len)


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
    assert summary.tokens_per_s == [5000 * 32, 5000 * 32]
    # The MFU torchtitan prints, which the trainer's benchmark compares with its own count.
    assert [record["mfu"] for record in torchtitan_records(lines, world_size=32)] == [pytest.approx(0.30)] * 2


TITAN = "[rank{rank}]:[titan] 2026-12-06 10:00:00,000 - root - INFO - "


def _titan_step(rank: int, step: int, loss: str, memory: float) -> str:
    return TITAN.format(rank=rank) + (
        f"step: {step:2}  loss: {loss}  grad_norm:  1.0000  memory: {memory:5.2f}GiB(50.00%)  tps: 5,000  "
        "tflops: 300.00  mfu: 30.00%"
    )


def test_torchtitan_ranks_lines_of_a_step_are_one_record_with_the_last_pipeline_stages_loss() -> None:
    """Two pipeline stages: the first logs loss -1 and less memory; the banner of rank 1 comes after rank 0's first
    step (srun forwards each node's output on its own); a validation line is no training step."""
    lines = [
        TITAN.format(rank=0) + "Training starts at step 1",
        _titan_step(0, 1, "-1.0000", 30.0),
        TITAN.format(rank=1) + "Training starts at step 1",
        _titan_step(1, 1, "11.5000", 40.0),
        _titan_step(1, 2, " 9.0000", 41.0),
        _titan_step(0, 2, "-1.0000", 31.0),
        TITAN.format(rank=1) + "validate step:  2  loss:  8.0000  memory: 41.00GiB(50.00%)  tps: 9,999",
        _titan_step(1, 3, " 8.5000", 41.0),
        _titan_step(0, 3, "-1.0000", 31.0),
    ]
    summary = summarize_log("torchtitan", lines, seq_len=8192, world_size=2)
    assert (summary.steps, summary.losses) == ([1, 2, 3], [11.5, 9.0, 8.5])
    assert summary.tokens_per_s == [10_000.0] * 3
    assert summary.max_memory_mb == pytest.approx(41.0 * 1024)
    assert (summary.warm_up_steps, summary.restarts) == ([1], 0)


def test_a_requeued_torchtitan_job_counts_a_restart_and_its_first_step_is_warm_up_again() -> None:
    banner = TITAN.format(rank=0) + "Training starts at step {}"
    first = [banner.format(1)] + [_titan_step(0, step, "9.0000", 40.0) for step in (1, 2, 3)]
    resumed = [banner.format(3)] + [_titan_step(0, step, "8.0000", 40.0) for step in (3, 4)]
    summary = summarize_log("torchtitan", first + resumed, seq_len=8192, world_size=1)
    assert summary.steps == [1, 2, 3, 4]
    assert summary.losses == [9.0, 9.0, 8.0, 8.0]  # step 3 as the resumed attempt logged it
    assert (summary.warm_up_steps, summary.restarts) == ([1, 3], 1)


def test_a_torchtitan_relaunch_before_the_first_checkpoint_is_an_attempt_of_its_own() -> None:
    """Both ranks' banners name step 1 twice: once for the first attempt, once for the relaunch after it died."""
    banners = [TITAN.format(rank=rank) + "Training starts at step 1" for rank in (0, 1)]
    first = [_titan_step(rank, 1, "9.0000", 40.0) for rank in (0, 1)]
    relaunch = [_titan_step(rank, step, "7.0000", 40.0) for step in (1, 2) for rank in (0, 1)]
    summary = summarize_log("torchtitan", banners + first + banners + relaunch, seq_len=8192, world_size=2)
    assert (summary.steps, summary.losses) == ([1, 2], [7.0, 7.0])  # the relaunch's step 1
    assert (summary.warm_up_steps, summary.restarts) == ([1], 1)


@pytest.mark.parametrize(
    ("framework", "line"),
    [
        ("torchtitan", TITAN.format(rank=0) + "step:  3  loss:     nan  memory: 40.00GiB(50.00%)  tps: 5,000"),
        ("picotron", "[rank 0] Step: 3 | Loss: nan | Global batch size: 1K | Tokens/s: 5K | MFU: 30.00%"),
        (
            "neuronx-distributed",
            "LOG Sat Dec 6 10:00:00 2026 - (0, 3) step_loss : inf learning_rate : 1e-04 throughput : 1.0",
        ),
    ],
)
def test_a_loss_that_is_not_a_number_is_a_divergence_not_a_missing_line(framework: str, line: str) -> None:
    summary = summarize_log(framework, [line], seq_len=8192, world_size=1)
    assert (summary.diverged_at, summary.steps) == (3, [])


# A step line of each framework that logs no start of its own, at step {step} with loss {loss}.
STEP_LINES = {
    "megatron-lm": (
        " [2026-12-06 10:00:00] iteration {step:8d}/     100 | consumed samples: 8 | elapsed time per iteration (ms): "
        "1000.0 | global batch size:     8 | lm loss: {loss} | loss scale: 1.0 |"
    ),
    "nemo": (
        "Training epoch 0, iteration {iteration}/99 | lr: 1e-04 | global_batch_size: 8 | global_step: {iteration} | "
        "reduced_train_loss: {loss} | train_step_timing in s: 1.0 | consumed_samples: 8"
    ),
    "neuronx-distributed": (
        "LOG Sat Dec 6 10:00:00 2026 - (0, {step}) step_loss : {loss} learning_rate : 1e-04 throughput : 1.0"
    ),
    "picotron": "[rank 0] Step: {step} | Loss: {loss} | Global batch size: 8K | Tokens/s: 8K | MFU: 30.00%",
}


def _steps(framework: str, steps: list[int], loss: float) -> list[str]:
    return [STEP_LINES[framework].format(step=step, iteration=step - 1, loss=loss) for step in steps]


@pytest.mark.parametrize("framework", list(STEP_LINES))
def test_a_requeued_job_appending_to_the_log_counts_a_restart_where_the_steps_go_back(framework: str) -> None:
    # The requeued job resumes from its checkpoint of step 2, after it had logged step 3.
    lines = _steps(framework, [1, 2, 3], 9.0) + _steps(framework, [3, 4], 8.0)
    summary = summarize_log(framework, lines, seq_len=1024, world_size=1, peak_flops=989e12)
    assert summary.steps == [1, 2, 3, 4]
    assert summary.losses == [9.0, 9.0, 8.0, 8.0]  # step 3 as the resumed attempt logged it
    assert (summary.warm_up_steps, summary.restarts) == ([1, 3], 1)


@pytest.mark.parametrize("framework", list(STEP_LINES))
def test_one_attempt_counts_no_restart(framework: str) -> None:
    summary = summarize_log(framework, _steps(framework, [1, 2, 3], 9.0), seq_len=1024, world_size=1)
    assert (summary.warm_up_steps, summary.restarts) == ([1], 0)
