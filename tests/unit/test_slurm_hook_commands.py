"""How ``SlurmHook`` reads the cluster's answers: squeue's and sacct's jobs (their submit times in UTC), sinfo's
reasons for the nodes that are down, and a job's log a bounded read at a time. The commands answer from a table."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from dtp.hooks.slurm import SlurmHook, SlurmJob


class Commands(SlurmHook):
    """A ``SlurmHook`` on this host whose commands answer from ``answers`` (by argv), recorded in ``ran``."""

    def __init__(self, answers: dict[tuple[str, ...], str]) -> None:
        super().__init__()
        self.__dict__["extra"] = {}
        self.answers = answers
        self.ran: list[list[str]] = []

    def run(self, argv: list[str], *, check: bool = True, input_text: str | None = None) -> str:
        self.ran.append(argv)
        return self.answers.get(tuple(argv), "")


def test_squeue_tells_an_active_jobs_submit_time_in_utc() -> None:
    squeue = ("env", "TZ=UTC", "squeue", "-h", "-o", "%i|%j|%T|%V|%R", "-n", "run-train")
    hook = Commands({squeue: "7|run-train|PENDING|2025-03-01T10:00:00|(Resources|Priority)\n"})
    assert hook.find_jobs("run-train") == [
        SlurmJob(
            "7",
            "run-train",
            "PENDING",
            reason="(Resources|Priority)",
            submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC),
        )
    ]


def test_sacct_tells_an_ended_jobs_exit_code_nodes_and_submit_time_in_utc() -> None:
    sacct = ("env", "TZ=UTC", "sacct", "-c", "-n", "-P")
    since = "--starttime=2000-01-01T00:00:00"
    hook = Commands(
        {
            ("scontrol", "show", "job", "-o", "7"): "",
            (*sacct, "-j", "7", "-o", "JobID,JobName,State,ExitCode,NodeList"): "7|run-train|NODE_FAIL|0:9|n[1-2]\n",
            (*sacct, "--name=run-train", since, "-o", "JobID,JobName,State,ElapsedRaw,Submit"): (
                "5|run-train|COMPLETED|61|2025-03-01T10:00:00\n6|run-train|CANCELLED by 0|3|Unknown\n"
            ),
        }
    )  # fmt: skip
    assert hook.get_job("7") == SlurmJob("7", "run-train", "NODE_FAIL", exit_code="0:9", nodes="n[1-2]")
    assert hook.ended_jobs("run-train") == [
        SlurmJob("5", "run-train", "COMPLETED", elapsed_s=61, submitted_at=datetime(2025, 3, 1, 10, tzinfo=UTC)),
        SlurmJob("6", "run-train", "CANCELLED", elapsed_s=3),
    ]


def test_unavailable_nodes_are_sinfos_reasons_for_the_partition() -> None:
    hook = Commands({("sinfo", "-R", "-h", "-o", "%N %E", "--partition=gpu"): "n1 Not responding\n\nn2 maint\n"})
    hook.__dict__["extra"] = {"partition": "gpu"}
    assert hook.unavailable_nodes() == ["n1 Not responding", "n2 maint"]


def test_read_log_reads_at_most_max_bytes_and_no_cut_character(tmp_path: Path) -> None:
    path = tmp_path / "o-7"
    path.write_bytes("ab\né\n".encode())  # é is two bytes: 3 and 4
    hook = Commands({})
    assert hook.read_log(str(path), 0, 4) == ("ab\n", 3)
    assert hook.read_log(str(path), 3, 4) == ("é\n", 6)
    assert hook.read_log(str(path), 6, 4) == ("", 6)
    assert hook.read_log(str(tmp_path / "missing"), 5, 4) == ("", 5)
