"""Preferences and method parameters are validated with errors that name the field."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from loramerge.merge_engine import (
    METHODS,
    InvalidParameterError,
    InvalidPreferenceError,
    MergeSpec,
    normalize_preference,
)

NAMES = ("code", "math", "medical")


def test_preference_is_normalised_in_pool_order() -> None:
    assert normalize_preference({"math": 3, "code": 1}, NAMES) == (0.25, 0.75, 0.0)
    assert normalize_preference({"math": 1e308, "code": 1e308}, NAMES) == (0.5, 0.5, 0.0)


@pytest.mark.parametrize(
    ("preference", "field", "message"),
    [
        ({}, "preference", "is empty"),
        ({"law": 1.0}, "preference['law']", "unknown adapter"),
        ({"math": -1.0}, "preference['math']", "≥ 0"),
        ({"math": math.nan}, "preference['math']", "finite"),
        ({"math": math.inf}, "preference['math']", "finite"),
        ({"math": 0.0, "code": 0}, "preference", "all weights are 0"),
        ({"math": "1"}, "preference['math']", "number"),
    ],
)
def test_bad_preferences_name_the_entry(preference: dict, field: str, message: str) -> None:
    with pytest.raises(InvalidPreferenceError) as info:
        normalize_preference(preference, NAMES)
    assert info.value.field == field
    assert message in str(info.value)


def test_unknown_adapter_error_lists_the_pool() -> None:
    with pytest.raises(InvalidPreferenceError, match="the pool has: code, math, medical"):
        normalize_preference({"law": 1}, NAMES)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidParameterError) as info:
        METHODS.get("magic")
    assert info.value.field == "method"
    for name in ("ta", "ties", "dare_linear", "dare_ties", "tsvm", "knots_ties", "core"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("ties", {"density": 0.0}, "density"),
        ("ties", {"density": 1.5}, "density"),
        ("ties", {"majority_sign": "most"}, "majority_sign"),
        ("dare_linear", {"drop_rate": 1.0}, "drop_rate"),
        ("dare_ties", {"drop_rate": -0.1}, "drop_rate"),
        ("dare_ties", {"seed": -1}, "seed"),
        ("ta", {"scaling": math.nan}, "scaling"),
        ("ta", {"density": 0.5}, "params.density"),
        ("core", {"inner": "magic"}, "inner"),
        ("core", {"inner": "ta", "density": 0.5}, "params.density"),
        ("core", {"inner": "ties", "density": 2.0}, "density"),
        ("svd_cur", {"branch_rank": 0}, "branch_rank"),
        ("svd_cur", {"mix": 1.5}, "mix"),
    ],
)
def test_bad_parameters_name_the_field(method: str, params: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        MergeSpec(method=method, params=params).resolved_params()
    assert info.value.field == field


def test_merge_spec_validates_rank_and_method() -> None:
    with pytest.raises(InvalidParameterError, match="rank"):
        MergeSpec(rank=0)
    with pytest.raises(InvalidParameterError, match="unknown merge method"):
        MergeSpec(method="nope").resolved_params()


def test_registry_rejects_duplicate_names() -> None:
    from loramerge.merge_engine.methods.registry import MethodRegistry
    from loramerge.merge_engine.methods.ta import TaskArithmetic

    with pytest.raises(ValueError, match="registered twice"):
        MethodRegistry([TaskArithmetic(), TaskArithmetic()])


def test_one_parameter_table_for_methods_proto_and_docs() -> None:
    """PARAMETERS = the union of the methods' parameter fields = the proto's MergeParameters,
    and docs/methods.md names each one."""
    from loramerge.merge_engine.methods.parameters import PARAMETERS
    from loramerge.v1 import merge_pb2

    fields = {
        f.name
        for name in METHODS.names()
        for f in dataclasses.fields(METHODS.get(name).params_type)
    }
    assert set(PARAMETERS) == fields
    assert set(PARAMETERS) == set(merge_pb2.MergeParameters.DESCRIPTOR.fields_by_name)
    docs = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    assert all(f"`{name}`" in docs for name in PARAMETERS)
