"""Stage-file rows checked by msgspec where that is exact: a mirror of a pydantic row model, derived from its fields.

Reading a JSONL row the careful way (`runfiles.parse_row`: json.loads, then the model's validation) costs several
microseconds a line; a query's many samples make it most of what assemble, vote and judge spend before any work.
`decoder(Model)` gives a msgspec decoder of a ``msgspec.Struct`` with the model's fields, in its order, with its
types, bounds (``ge``/``le``), defaults and refusal of unknown keys, built from ``Model.model_fields``, so the
model stays the one place a row is described. It refuses a little more than pydantic does (a float for an int, a
string for a number, NaN, Infinity and out-of-range numbers, lone surrogates), never less: a line it refuses goes
the careful way, which gives the same row or the same error (file, line, field). Where the values it gives are
equal to pydantic's (the ints, floats, strings and Any values of the JSON), and where msgspec accepts a line
pydantic accepts it too; `tests/test_fast_rows.py` checks both over every row model.

A model with anything this does not translate (validators, aliases, other constraints, a type outside the list
in `_type`, extra keys allowed) gets no decoder (None): it is read the careful way only.
"""

from __future__ import annotations

import types
import typing
from functools import lru_cache
from typing import Annotated, Any, Literal, Optional, Union

import msgspec
from annotated_types import Ge, Le
from pydantic import BaseModel
from pydantic_core import PydanticUndefined


class Untranslatable(Exception):
    """A field type or setting the mirror does not translate."""


_PLAIN = {str: str, int: int, float: float, bool: bool, Any: Any}


def _type(tp, structs: dict):
    """The msgspec type of a pydantic annotation (str, int, float, bool, Any, Literal of strings, Optional, list,
    dict with str keys, a row model)."""
    if tp in _PLAIN:
        return _PLAIN[tp]
    if tp is dict:
        return dict[str, Any]
    if tp is list:
        return list[Any]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return _struct(tp, structs)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal and all(type(a) is str for a in args):
        return tp
    if origin in (Union, types.UnionType) and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[_type(inner, structs)]
    if origin is list and len(args) == 1:
        return list[_type(args[0], structs)]
    if origin is dict and len(args) == 2 and args[0] is str:
        return dict[str, _type(args[1], structs)]
    raise Untranslatable(f"type {tp!r}")


def _bounds(metadata: list) -> Optional[msgspec.Meta]:
    kw = {}
    for m in metadata:
        if isinstance(m, Ge):
            kw["ge"] = m.ge
        elif isinstance(m, Le):
            kw["le"] = m.le
        else:
            raise Untranslatable(f"constraint {m!r}")
    return msgspec.Meta(**kw) if kw else None


def _struct(model: type[BaseModel], structs: dict) -> type:
    if model in structs:
        return structs[model]
    if model.model_config.get("extra") != "forbid" or set(model.model_config) - {"extra", "title"}:
        raise Untranslatable(f"{model.__name__}'s config {dict(model.model_config)}")
    decorators = model.__pydantic_decorators__
    if any((decorators.validators, decorators.field_validators, decorators.root_validators,
            decorators.model_validators)) or model.model_computed_fields:
        raise Untranslatable(f"{model.__name__}'s validators")
    fields = []
    for name, info in model.model_fields.items():
        if info.alias not in (None, name) or info.validation_alias is not None:
            raise Untranslatable(f"{model.__name__}.{name}'s alias")
        meta = _bounds(info.metadata)
        tp = _type(info.annotation, structs)
        if meta is not None:  # on the value itself, inside an Optional (as pydantic applies it)
            args = typing.get_args(tp)
            tp = Optional[Annotated[args[0], meta]] if typing.get_origin(tp) is Union else Annotated[tp, meta]
        if info.default_factory is not None:
            fields.append((name, tp, msgspec.field(default_factory=info.default_factory)))
        elif info.default is PydanticUndefined:
            fields.append((name, tp))
        elif info.default is None or type(info.default) in (str, int, float, bool):
            fields.append((name, tp, info.default))
        else:
            raise Untranslatable(f"{model.__name__}.{name}'s default")
    structs[model] = msgspec.defstruct(model.__name__, fields, kw_only=True, forbid_unknown_fields=True)
    return structs[model]


@lru_cache(maxsize=None)
def struct(model: type[BaseModel]) -> Optional[type]:
    """``model``'s mirror (a ``msgspec.Struct`` class with its fields), or None where the model has something the
    mirror does not translate."""
    try:
        return _struct(model, {})
    except Untranslatable:
        return None


@lru_cache(maxsize=None)
def decoder(model: type[BaseModel]) -> Optional[msgspec.json.Decoder]:
    """A msgspec JSON decoder of ``model``'s mirror, or None where the model has none."""
    mirror = struct(model)
    return None if mirror is None else msgspec.json.Decoder(mirror)


@lru_cache(maxsize=None)
def fields(names: tuple[str, ...]) -> type:
    """A struct of just these fields of a JSON object, any values, ``msgspec.UNSET`` where one is absent: msgspec
    skips the object's other keys (a light read of a few fields of long lines)."""
    return msgspec.defstruct("Fields", [(name, Any, msgspec.UNSET) for name in names])
