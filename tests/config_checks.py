"""What every config model's number and switch fields must refuse (shared by the update and bench
config tests): the values pydantic's lax mode would coerce."""

from __future__ import annotations

import math
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

BAD_NUMBERS = [math.inf, -math.inf, math.nan, "1e400", "1_0", " 3", True, False]
BAD_SWITCHES = [1, 0, 1.0, "yes", "off", "true"]


def _number_fields(annotation) -> tuple[set, bool]:
    """(base types, inside a list) of ``float``, ``Annotated[...]``, ``Optional[...]``, ``list[...]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _number_fields(args[0])
    if origin is list:
        return _number_fields(args[0])[0], True
    if origin in (typing.Union, types.UnionType):
        parts = [_number_fields(a) for a in args]
        return set().union(*(p[0] for p in parts)), any(p[1] for p in parts)
    return {annotation}, False


def lax_values_refused(model: type[BaseModel]) -> list[str]:
    """Validate every bad value on every number field (list items included) and switch of ``model``,
    asserting each is refused at exactly that field; returns the keys checked."""
    checked = []
    for name, field in model.model_fields.items():
        kinds, in_list = _number_fields(field.annotation)
        if kinds & {float, int}:
            bad = BAD_NUMBERS
        elif bool in kinds:
            bad = BAD_SWITCHES
        else:
            continue
        key = field.alias or name
        for value in bad:
            with pytest.raises(ValidationError) as info:
                model.model_validate({key: [value] if in_list else value})
            expected = (key, 0) if in_list else (key,)
            assert [e["loc"] for e in info.value.errors()] == [expected], (key, value)
        checked.append(key)
    return checked
