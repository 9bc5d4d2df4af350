"""Command-line options generated from a pydantic config model, and back into a config.

Each field of the model becomes one option, declared nowhere else:

- its flag is ``--field-name`` (``max_steps`` -> ``--max-steps``), or the flags an
  ``Annotated[..., CliFlag("--flag", ...)]`` gives it;
- its type comes from the annotation: ``str``, ``int``, ``float``, ``Path``, a ``Literal``
  (a choice), ``bool`` (``--x/--no-x``), ``list[...]`` (repeatable; a ``list[str]`` also
  takes ``a,b,c``); ``X | None`` is ``X``;
- its help is the field's ``description``, and ``--help`` shows its default.

Options are given the value ``None`` unless set on the command line, so a YAML config
(``--config``) fills what the flags leave unset (:func:`config_from_options`); the model then
validates the whole, and an invalid value is a :class:`OptionsError` naming the flag.
Fields marked ``CliFlag(skip=True)`` (nested sections, values that other options build) get
no option of their own.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tracetune.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class OptionsError(ConfigError):
    """Options (flags or YAML keys) that do not make a valid config."""


def _cli_meta(info: FieldInfo) -> Any:
    for meta in info.metadata:
        if hasattr(meta, "flags") and hasattr(meta, "skip"):
            return meta
    return None


class _TextField:
    """Command-line metadata of a field read as text (see ``config_params(text=...)``)."""

    skip = False
    text = True

    def __init__(self, flags: tuple[str, ...], metavar: str) -> None:
        self.flags, self.metavar = flags, metavar


def _strip_optional(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    if origin is typing.Annotated:
        return _strip_optional(typing.get_args(annotation)[0])
    return annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flags(name: str, info: FieldInfo) -> tuple[str, ...]:
    """The flags of field ``name`` (its own ``--name`` unless ``CliFlag`` names others)."""
    meta = _cli_meta(info)
    if meta is not None and meta.flags:
        return tuple(meta.flags)
    return (_flag(name),)


def _default(info: FieldInfo) -> Any:
    """The field's default as the option shows it (None: no default to show)."""
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]
    else:
        return None
    if value is None or value == [] or value == {}:
        return None
    return value


def _choices(name: str, values: list[str]) -> type[Enum]:
    return Enum(name, {v: v for v in values}, type=str)  # type: ignore[return-value]


def _literal_text(annotation: Any) -> bool:
    """A ``Literal`` of strings (a list of them reads as text: ``--x a,b``)."""
    inner = _strip_optional(annotation)
    return typing.get_origin(inner) is Literal and all(
        isinstance(a, str) for a in typing.get_args(inner)
    )


def _list_choices(annotation: Any) -> list[str]:
    """The choices of a ``list[Literal[...]]`` field (empty for any other)."""
    inner = _strip_optional(annotation)
    args = typing.get_args(inner) if typing.get_origin(inner) in (list, tuple, set) else ()
    return (
        [str(a) for a in typing.get_args(_strip_optional(args[0]))]
        if args and _literal_text(args[0])
        else []
    )


def _option_type(annotation: Any, name: str) -> Any:
    """The type typer reads a field's text as (``X | None``: typer's option default is
    None, so an unset option is told apart from a set one)."""
    inner = _strip_optional(annotation)
    origin = typing.get_origin(inner)
    if origin in (list, tuple, set, frozenset):
        args = typing.get_args(inner)
        if args and _literal_text(args[0]):
            return list[str]  # "a,b" or repeated; the model checks each choice
        item = _option_type(args[0] if args else str, name)
        return list[item]  # type: ignore[valid-type]
    if origin is Literal:
        return _choices(name, [str(a) for a in typing.get_args(inner)])
    if isinstance(inner, type) and issubclass(inner, Enum):
        return inner
    if inner in (bool, int, float, str):
        return inner
    if isinstance(inner, type) and issubclass(inner, Path):
        return Path
    raise TypeError(
        f"field {name!r} has a type the command line cannot take ({annotation!r}): mark it "
        "CliFlag(skip=True) and give it another option"
    )


def config_params(
    model: type[BaseModel],
    skip: set[str] | frozenset[str] = frozenset(),
    text: Mapping[str, str] | None = None,
) -> list[inspect.Parameter]:
    """One typer option per field of ``model`` (but ``skip`` and ``CliFlag(skip=True)``),
    as keyword parameters for a command function's signature (see :func:`command_function`).

    ``text``: fields whose option takes text (field name -> metavar, e.g. ``"DURATION"``),
    which the command converts before validation; the same as ``CliFlag(text=True)`` for a
    model that carries no command-line metadata of its own."""
    params: list[inspect.Parameter] = []
    text = text or {}
    for name, info in model.model_fields.items():
        meta = _cli_meta(info)
        if name in skip or (meta is not None and meta.skip):
            continue
        if name in text:
            meta = _TextField(field_flags(name, info), text[name])
        flags = field_flags(name, info)
        help_text = " ".join((info.description or "").split())
        choices = _list_choices(info.annotation)
        if choices:
            help_text += f" Any of: {', '.join(choices)} (a,b or repeated)."
        default = _default(info)
        if info.is_required():
            # Required unless a --config file gives it: checked when the config is built.
            help_text += " (required; or a --config key)"
        kind = str if meta is not None and meta.text else _option_type(info.annotation, name)
        if kind is bool:
            flags = tuple(f"{f}/--no-{f.removeprefix('--')}" for f in flags[:1]) + flags[1:]
        if default is not None and isinstance(kind, type) and issubclass(kind, Enum):
            default = kind(default.value if isinstance(default, Enum) else str(default))
        elif isinstance(default, Path | Enum) or (meta is not None and meta.text):
            default = None if default is None else str(getattr(default, "value", default))
        option = typer.Option(
            *flags,
            help=help_text,
            show_default=default is not None,
            metavar=meta.metavar if meta is not None and meta.metavar else None,
        )
        # The option shows the field's default; the command passes None for an option that
        # was not given (see command_function), so a --config file can fill it.
        params.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=default,
                annotation=typing.Annotated[kind | None, option],
            )
        )
    return params


def config_argument(params: list[inspect.Parameter], help: str) -> list[inspect.Parameter]:
    """``params`` with the ``config`` YAML file as the command's first, required argument
    (``tracetune synth run CONFIG``) instead of a ``--config`` option."""
    argument = inspect.Parameter(
        "config",
        inspect.Parameter.KEYWORD_ONLY,
        annotation=typing.Annotated[Path, typer.Argument(help=help)],
    )
    return [argument, *(p for p in params if p.name != "config")]


def section_model(model: type[BaseModel], section: str) -> type[BaseModel]:
    """The model of ``model``'s nested section field ``section``."""
    annotation = _strip_optional(model.model_fields[section].annotation)
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        raise TypeError(f"{model.__name__}.{section} is not a nested config section")
    return annotation


def _outer_names(model: type[BaseModel], section: str) -> set[str]:
    """``model``'s field names that a field of ``section`` may not take as its flag (the
    section's own name may: ``operators: {operators: [...]}`` reads as ``--operators``)."""
    return set(model.model_fields) - {section}


def section_params(model: type[BaseModel], section: str) -> list[inspect.Parameter]:
    """Options for the fields of ``model``'s section ``section`` (a YAML mapping under that
    key). A section field named like another of ``model``'s fields gets no option: the flag
    means the outer field, and the section's stays a YAML key."""
    inner = section_model(model, section)
    return config_params(inner, skip=set(inner.model_fields) & _outer_names(model, section))


def pop_section(model: type[BaseModel], section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Take the options :func:`section_params` made out of ``values``; returns those that
    were set, for ``config_from_options(extra={section: ...})``."""
    inner = section_model(model, section)
    own = [name for name in inner.model_fields if name not in _outer_names(model, section)]
    return option_values(inner, {name: values.pop(name) for name in own if name in values})


def command_function(
    callback: Callable[..., Any], params: list[inspect.Parameter], doc: str | None = None
) -> Callable[..., Any]:
    """A function typer can register as a command: keyword parameters ``params`` (typer
    annotations on them), calling ``callback(**values)``, where an option that was not given
    on the command line (nor by its environment variable) is None."""

    def command(ctx: typer.Context, **values: Any) -> Any:
        for name in values:
            source = ctx.get_parameter_source(name)
            if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
                values[name] = None
        return callback(**values)

    context = inspect.Parameter(
        "ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context
    )
    command.__signature__ = inspect.Signature([context, *params])  # type: ignore[attr-defined]
    command.__annotations__ = {"ctx": typer.Context, **{p.name: p.annotation for p in params}}
    command.__doc__ = doc
    return command


def option_values(model: type[BaseModel], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``model``'s generated options that were set, by field name (a
    ``list[str]`` option's ``a,b`` split at the commas)."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        if value is None or value == () or value == []:
            continue
        if isinstance(value, list | tuple):
            item = typing.get_args(_strip_optional(info.annotation))
            value = [v.value if isinstance(v, Enum) else v for v in value]
            if item and (item[0] is str or _literal_text(item[0])):
                value = [part.strip() for v in value for part in str(v).split(",") if part.strip()]
        elif isinstance(value, Enum):
            value = value.value
        out[name] = value
    return out


def _error_line(
    model: type[BaseModel],
    err: Any,
    what: str,
    unknown: Callable[[str], str | None] | None = None,
) -> str:
    loc = [str(p) for p in err["loc"]]
    message = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        return f"  {message}"
    if err.get("type") == "extra_forbidden" and len(loc) == 1:
        whose = unknown(loc[0]) if unknown is not None else None
        return f"  {loc[0]}: not an option of {what}" + (f" ({whose})" if whose else "")
    info = model.model_fields.get(loc[0])
    if info is not None and len(loc) == 1:
        meta = _cli_meta(info)
        if meta is None or not meta.skip:
            where = f"{field_flags(loc[0], info)[0]} (YAML key {loc[0]})"
            return f"  {where}: {message}"
    if info is not None and len(loc) >= 2:  # a field of a section: its flag, if it has one
        inner = _strip_optional(info.annotation)
        field = (
            inner.model_fields.get(loc[1])
            if isinstance(inner, type) and issubclass(inner, BaseModel)
            else None
        )
        has_flag = loc[1] not in _outer_names(model, loc[0])  # not YAML-only (see sections)
        if field is not None and has_flag and not getattr(_cli_meta(field), "skip", False):
            flag = field_flags(loc[1], field)[0]
            return f"  {flag} (YAML key {'.'.join(loc[:2])}): {message}"
    return f"  {'.'.join(loc)}: {message}"


def validate_config(
    model: type[M],
    data: Mapping[str, Any],
    what: str | None = None,
    unknown: Callable[[str], str | None] | None = None,
) -> M:
    """``model`` from ``data``; an invalid value raises :class:`OptionsError` naming each
    bad option by its flag and YAML key. ``unknown(key)`` may say whose a key that is not a
    field is (e.g. another command's option)."""
    what = what or model.__name__
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        lines = [_error_line(model, err, what, unknown) for err in exc.errors()]
        raise OptionsError(
            f"invalid options for {what}:\n" + "\n".join(lines),
            hint="see --help for each option's type and default",
        ) from None


def config_from_options(
    model: type[M],
    values: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    what: str | None = None,
    read_file: Callable[[type[BaseModel], Path | None], dict[str, Any]] | None = None,
    unknown: Callable[[str], str | None] | None = None,
) -> M:
    """The config from the YAML ``config_file`` (if any), the generated options that were
    set in ``values`` and the ``extra`` field values other options built, laid over it in
    that order (a dict in ``extra`` merges into its YAML section key by key)."""
    from tracetune.cli.common import merge_flags, read_config_file

    data = (read_file or read_config_file)(model, config_file)
    flags = {**option_values(model, values), **(extra or {})}
    return validate_config(model, merge_flags(data, flags), what, unknown)


__all__ = [
    "OptionsError",
    "command_function",
    "config_argument",
    "config_from_options",
    "config_params",
    "field_flags",
    "option_values",
    "pop_section",
    "section_model",
    "section_params",
    "validate_config",
]
