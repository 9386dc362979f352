"""The train_e2e trigger form's JSON schema (dtp.form.airflow_params): one param per field, and it refuses and
accepts what validate_params does."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from dtp.form import airflow_params
from dtp.form_params import ParamsError
from dtp.params import S3_URI, TrainParams, validate_params
from dtp.recipes import PLATFORMS, catalogue, instance_types, recipe_names


@pytest.fixture(scope="module")
def form() -> dict[str, Any]:
    return airflow_params()


def test_form_has_one_param_per_field(form: dict[str, Any]) -> None:
    assert sorted(form) == sorted(TrainParams.model_fields)
    assert list(form)[: len(TrainParams.leading)] == list(TrainParams.leading)


def test_form_schema_enums_limits_and_patterns(form: dict[str, Any]) -> None:
    assert form["recipe"].schema["enum"] == recipe_names() == sorted(catalogue())
    assert form["platform"].schema["enum"] == list(PLATFORMS)
    assert form["instance_type"].schema["enum"] == sorted(instance_types()) and "p5.48xlarge" in sorted(
        instance_types()
    )
    assert form["num_nodes"].schema["type"] == "integer"
    assert (form["num_nodes"].schema["minimum"], form["num_nodes"].schema["maximum"]) == (1, 512)
    assert form["dataset_uri"].schema["pattern"] == S3_URI
    assert form["dataset_uri"].schema["maxLength"] == 1024
    assert form["instance_type"].schema["pattern"] == TrainParams.model_fields["instance_type"].metadata[-1].pattern
    assert form["expiry_hours"].schema["exclusiveMinimum"] == 0
    assert form["extra_env"].schema["type"] == "object"
    assert form["keep_cluster"].schema["type"] == "boolean"


def test_form_defaults_are_the_model_defaults_and_satisfy_their_schema(form: dict[str, Any]) -> None:
    defaults = TrainParams().model_dump()
    for name, param in form.items():
        # An empty text default is null in the form (see below); the model reads null as that default.
        assert param.value == (defaults[name] if defaults[name] != "" else None), name
        jsonschema.validate(param.value, param.schema)
        param.resolve()  # Airflow's own check of the default


# Values both the model and the form's JSON schema can refuse.
SCHEMA_BAD = [
    ("recipe", "nope"),
    ("platform", "azure"),
    ("num_nodes", 0),
    ("num_nodes", 10000),
    ("num_nodes", 2.5),
    ("num_nodes", None),
    ("max_steps", 0),
    ("checkpoint_interval", 0),
    ("budget_usd", -1),
    ("expiry_hours", 0),
    ("hang_timeout_minutes", 2000),
    ("keep_cluster", "maybe"),
    ("dataset_uri", "http://x"),
    ("dataset_uri", "s3://"),
    ("dataset_uri", "s3://UPPER/x"),
    ("dataset_uri", "s3://b/../../etc"),
    ("dataset_uri", "s3://bucket/a b"),
    ("dataset_uri", "s3://bucket/" + "a" * 2000),
    ("instance_type", "p5.48xlarge; rm -rf /"),
    ("instance_type", "$(id)"),
    ("instance_type", "x" * 40 + ".large"),
    ("extra_env", ["X=1"]),
    ("extra_env", {"NCCL_DEBUG": 1}),
]


@pytest.mark.parametrize(("field", "value"), SCHEMA_BAD)
def test_form_schema_refuses_what_validation_refuses(form: dict[str, Any], field: str, value: Any) -> None:
    with pytest.raises(ParamsError, match=r"^invalid parameters:"):
        validate_params({field: value})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value, form[field].schema)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_nodes", 512),
        ("dataset_uri", "s3://my-bucket/datasets/sample/"),
        ("extra_env", {"NCCL_DEBUG": "INFO"}),
        ("budget_usd", 0),
        ("expiry_hours", 3.5),
    ],
)
def test_form_schema_accepts_what_validation_accepts(form: dict[str, Any], field: str, value: Any) -> None:
    validate_params({field: value})
    jsonschema.validate(value, form[field].schema)


def test_empty_text_fields_are_optional_in_the_form_and_mean_their_default(form: dict[str, Any]) -> None:
    # An empty *required* text field disables the UI's Trigger button: optional ones are ["string", "null"].
    for name in ("dataset_uri", "exclude_nodes"):
        assert form[name].schema["type"] == ["string", "null"] and form[name].value is None
    assert form["recipe"].schema["type"] == "string"
    params = validate_params({"dataset_uri": None, "exclude_nodes": None})
    assert (params.dataset_uri, params.exclude_nodes) == ("", "")
    with pytest.raises(ParamsError, match="recipe: got None"):
        validate_params({"recipe": None})
