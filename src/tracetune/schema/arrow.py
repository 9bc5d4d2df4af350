"""Derive a fixed Arrow schema from a record class, so every Parquet chunk agrees.

Inferring a schema per chunk breaks as soon as one chunk holds only nulls in a column
that another chunk fills; ``datasets`` then refuses to concatenate them. Deriving the schema
from the pydantic model once avoids that, and keeps the on-disk shape a function of the
schema version alone.
"""

from __future__ import annotations

import types
from functools import cache
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pyarrow as pa
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from tracetune.schema.records import STORED_AS_JSON

_SCALARS: dict[Any, pa.DataType] = {
    str: pa.string(),
    int: pa.int64(),
    float: pa.float64(),
    bool: pa.bool_(),
}


def arrow_type(annotation: Any) -> pa.DataType:
    """Arrow type of one field annotation (JSON-typed fields become strings)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *meta = get_args(annotation)
        return pa.string() if any(m is STORED_AS_JSON for m in meta) else arrow_type(base)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"cannot store a union of {args} in Arrow; use JsonValue")
        return arrow_type(args[0])
    if origin is Literal:
        return arrow_type(type(get_args(annotation)[0]))
    if origin is list:
        return pa.list_(arrow_type(get_args(annotation)[0]))
    if origin is dict:
        return pa.string()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(_fields(annotation))
    if isinstance(annotation, type):
        for base, typ in _SCALARS.items():
            if issubclass(annotation, base):  # StrEnum -> str, bool before int handled below
                return pa.bool_() if annotation is bool else typ
    raise TypeError(f"no Arrow type for annotation {annotation!r}")


def _field_type(info: FieldInfo) -> pa.DataType:
    # pydantic moves a field's own Annotated metadata into info.metadata.
    if any(m is STORED_AS_JSON for m in info.metadata):
        return pa.string()
    return arrow_type(info.annotation)


def _fields(model: type[BaseModel]) -> list[pa.Field]:
    return [pa.field(name, _field_type(info)) for name, info in model.model_fields.items()]


@cache
def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    """The Arrow schema every Parquet chunk of ``model`` records is written with."""
    return pa.schema(_fields(model))
