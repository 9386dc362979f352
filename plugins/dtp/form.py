"""A DAG's trigger form from a params model: one typed ``Param`` per field, so the form and the validation of a
run's conf (``dtp.params``) cannot drift apart."""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from dtp.form_params import FormParams
from dtp.params import TrainParams
from dtp.recipes import PLATFORMS, instance_types, recipe_names


def airflow_params(
    defaults: dict[str, Any] | None = None,
    recipes: list[str] | None = None,
    model: type[FormParams] = TrainParams,
) -> dict[str, Any]:
    """The trigger form: one ``Param`` per field, its JSON schema taken from ``model``.

    ``defaults`` overrides the form's default values (a regression DAG's recipe
    defaults); ``recipes`` limits the recipe dropdown (default: the catalogue).
    """
    properties = model.model_json_schema()["properties"]
    order = [*model.leading, *(name for name in properties if name not in model.leading)]
    defaults = defaults or {}
    form = {}
    for name in order:
        prop = properties[name]
        spec = {k: v for k, v in prop.items() if k in _PARAM_KEYS}
        if name == "recipe":
            spec["enum"] = recipes or recipe_names()
        if name == "platform":
            spec["enum"] = list(PLATFORMS)
        if name == "instance_type":  # a list to pick from, as validate_params accepts only these
            spec["enum"] = sorted(instance_types())
        if name == "extra_env":
            spec["type"] = "object"
        default = defaults.get(name, prop.get("default", {}))
        if default == "" and spec.get("type") == "string":
            # The UI form treats an empty required field as missing and disables Trigger; an optional text
            # field is ["string", "null"] (Airflow's convention) and an emptied one arrives as null.
            spec["type"] = ["string", "null"]
            default = None
        form[name] = Param(default, **spec)
    return form


_PARAM_KEYS = {
    "type",
    "title",
    "description",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "maxLength",
    "pattern",
    "enum",
    "items",
    "minItems",
    "uniqueItems",
    "additionalProperties",  # extra_env's values are strings: {"NCCL_DEBUG": 1} is refused in the form too
}
