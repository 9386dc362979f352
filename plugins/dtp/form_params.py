"""A DAG's trigger form as a pydantic model (``FormParams``), and a run's conf parsed against one
(``parse_params``) into the model or a ``ParamsError`` that names each bad field, its value and what is allowed."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from dtp.params_env import describe_extra_env

P = TypeVar("P", bound=BaseModel)


class ParamsError(ValueError):
    """Invalid run parameters; the message names each field, its value and what is allowed."""

    @classmethod
    def from_problems(cls, *problems: str) -> ParamsError:
        """The error for a run's bad parameters, one problem a line (``field: got <value>; <what is allowed>``)."""
        return cls("invalid parameters:\n" + "\n".join(problems))


class FormParams(BaseModel):
    """A DAG's trigger form as a model: unknown keys refused, types judged as the form's JSON schema does."""

    # strict: "2" is not 2 and true is not 1, exactly as the trigger form's JSON schema judges them.
    model_config = ConfigDict(extra="forbid", strict=True)
    # Fields the trigger form shows first; the rest follow in declaration order.
    leading: ClassVar[tuple[str, ...]] = ()

    @field_validator("*", mode="before")
    @classmethod
    def _empty_text(cls, value: Any, info: ValidationInfo) -> Any:
        """A text field the form left empty arrives as null: it means the field's empty default."""
        field = cls.model_fields[info.field_name] if info.field_name else None
        return "" if value is None and field is not None and field.default == "" else value


def _problems(err: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line for each field ``err`` refuses: the field, its value and what is allowed."""
    lines = []
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        if item["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown parameter (allowed: {', '.join(model.model_fields)})")
        elif not field:  # a check across fields: its message names them, and the input is the whole conf
            lines.append(message)
        elif item["loc"][0] == "extra_env":  # its values may be tokens: the variables' names only
            lines.append(f"{field}: got {_short(describe_extra_env(item.get('input')))}; {message}")
        else:
            lines.append(f"{field}: got {_short(repr(item.get('input')))}; {message}")
    return lines


def _short(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def parse_params(model: type[P], conf: dict[str, Any]) -> P:
    """``conf`` as ``model``, or ``ParamsError`` naming every bad field, its value and what is allowed."""
    try:
        return model.model_validate(conf)
    except ValidationError as err:
        raise ParamsError.from_problems(*_problems(err, model)) from None
