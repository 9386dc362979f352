"""dtp.operators.time_limit: what a retried task's job may run of the time limit its earlier jobs used."""

from __future__ import annotations

import logging

import pytest
from airflow.sdk.exceptions import AirflowFailException

from dtp.operators.time_limit import time_left


class JobOverTime(AirflowFailException):
    """An operator's own exception for a time limit used up."""


def left(limit: int, used: int, minimum: int = 60, **kwargs: str) -> int | None:
    return time_left(limit, used, minimum, unit="s", used_by="earlier train jobs ran", over_time=JobOverTime, **kwargs)


def test_a_new_job_gets_the_limit_less_what_the_earlier_ones_used(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dtp.operators.time_limit"):
        assert left(3600, 1200) == 2400
    assert caplog.messages == ["Earlier train jobs ran 1200 s: the next one may run 2400 s"]


def test_a_first_job_gets_the_whole_limit_without_a_word(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="dtp.operators.time_limit"):
        assert left(3600, 0) == 3600
    assert caplog.messages == []


@pytest.mark.parametrize("limit", [0, -1])
def test_no_limit_is_none_whatever_was_used(limit: int) -> None:
    assert left(limit, 5000) is None


def test_exactly_the_minimum_left_is_enough() -> None:
    assert left(3600, 3540) == 60


def test_less_than_the_minimum_left_raises_the_operators_exception() -> None:
    with pytest.raises(JobOverTime) as raised:
        left(3600, 3550)
    assert str(raised.value) == (
        "earlier train jobs ran 3550 s of the 3600 s time limit, leaving less than 60 s; not submitting another"
    )


def test_the_error_names_the_limit_the_minimum_and_what_is_not_done() -> None:
    with pytest.raises(JobOverTime) as raised:
        time_left(
            5,
            5,
            1,
            unit="min",
            used_by="PyTorchJob train was active",
            over_time=JobOverTime,
            limit_name="left of its deadline",
            minimum_name="the shortest deadline",
            refused="not creating another",
        )
    assert str(raised.value) == (
        "PyTorchJob train was active 5 min of the 5 min left of its deadline, leaving less than the shortest deadline"
        " (1 min); not creating another"
    )
