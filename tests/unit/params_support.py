"""What the validate_params tests share: a run's names, and the refusal of a conf."""

from __future__ import annotations

from typing import Any

import pytest

from dtp.form_params import ParamsError
from dtp.naming import RunNames
from dtp.params import validate_params

NAMES = RunNames("train_e2e", "manual__1")


def refuse(conf: dict[str, Any]) -> str:
    """The message of the ParamsError validate_params refuses ``conf`` with."""
    with pytest.raises(ParamsError) as info:
        validate_params(conf)
    message = str(info.value)
    assert message.startswith("invalid parameters:")
    return message
