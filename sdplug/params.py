"""Validated strategy parameters: the one place where keyword arguments meet their constraints.

Strategies declare their parameters as fields of a pydantic dataclass (see ``strategy_params``),
so ``create(...)``, presets and the CLI all validate through the same constraints and report a
problem as ``PresetError`` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from typing import Any, Literal, TypeVar

import annotated_types
import pydantic
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from sdplug.errors import PresetError, did_you_mean, raise_together

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover - Python 3.10
    from typing_extensions import dataclass_transform

_T = TypeVar("_T")

# strict: "0.8" is not silently read as 0.8, nor true as 1; an int is still a valid float.
# allow_inf_nan off: TOML writes nan and inf, which no parameter means (nan fails every bound
# with a misleading "should be less than ..."; an unbounded float would take it silently).
STRATEGY_CONFIG = pydantic.ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=True, allow_inf_nan=False)


# dataclass_transform: type checkers then know a decorated class's fields and its keyword
# constructor, as they do for pydantic's own decorator (whose field specifiers these are).
@dataclass_transform(field_specifiers=(dataclasses.field, pydantic.Field))
def strategy_params(cls: type[_T]) -> type[_T]:
    """Class decorator: turn a strategy class into a validating dataclass of its parameters."""
    # pydantic types its result as type[PydanticDataclass]; it is ``cls`` (a subclass
    # of it when ``cls`` is already a stdlib dataclass) made a validating dataclass
    return typing.cast("type[_T]", _pydantic_dataclass(cls, config=STRATEGY_CONFIG))


def field_names(cls) -> list[str]:
    """The parameter names a strategy class accepts (empty for a class without fields)."""
    fields = getattr(cls, "__pydantic_fields__", None)
    if fields is not None:
        return list(fields)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return []


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One declared parameter of a strategy: its name, default (as TOML) and what it accepts."""

    name: str
    default: str
    allowed: str


def declared_parameters(cls) -> list[Parameter]:
    """Every parameter ``cls`` declares, in order, read from its fields (so always what it validates)."""
    fields = getattr(cls, "__pydantic_fields__", {})
    parameters = []
    for name in field_names(cls):
        info = fields.get(name)
        if info is None:
            default = "see the strategy's documentation"
        elif info.default_factory is not None:
            default = _toml_literal(info.default_factory())
        elif info.is_required():
            default = "none: required"
        else:
            default = _toml_literal(info.default)
        parameters.append(Parameter(name, default, describe_allowed(cls, name)))
    return parameters


def _toml_literal(value: Any) -> str:
    """``value`` as it is written in a preset; None (TOML has no null) as 'not set'."""
    if value is None:
        return "not set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # TOML's basic strings escape as JSON does
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    return str(value)


def describe_allowed(cls, name: str) -> str:
    """Say in words what a field accepts, e.g. 'a number > 0 and <= 1'."""
    info = getattr(cls, "__pydantic_fields__", {}).get(name)
    if info is None:
        return "see the strategy's documentation"
    return _describe(info.annotation, list(info.metadata))


def _describe(annotation: Any, metadata: list) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _describe(args[0], list(args[1:]) + metadata)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        return " or ".join(_describe(a, metadata if a is not type(None) else []) for a in args)
    if annotation is type(None):
        return "nothing (omit the key)"
    noun = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )
    bounds = []
    if origin in (list, tuple):
        inner = ", ".join(_describe(a, []) for a in args if a is not Ellipsis)
        lengths = {getattr(m, "min_length", None) for m in metadata} | {getattr(m, "max_length", None) for m in metadata}
        lengths.discard(None)
        count = f"{lengths.pop()} " if len(lengths) == 1 else ""
        return f"a list of {count}items, each {inner}"
    for item in metadata:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, attr, None)
            if value is not None and isinstance(item, annotated_types.BaseMetadata):
                bounds.append(f"{symbol} {value}")
        if isinstance(item, pydantic.fields.FieldInfo):
            bounds.extend(_describe(annotation, list(item.metadata)).split(" ", 2)[2:])
    return noun + (" " + " and ".join(bounds) if bounds else "")


def check_known_keys(table, allowed, *, what: str, path: str | None, key: str) -> None:
    """A ``PresetError`` for every key of ``table`` not in ``allowed``, each with a suggestion."""
    raise_together(unknown_key_errors(table, allowed, what=what, path=path, key=key))


def unknown_key_errors(table, allowed, *, what: str, path: str | None, key: str) -> list[PresetError]:
    """One ``PresetError`` per key of ``table`` not in ``allowed``, each with a suggestion."""
    return [
        PresetError(
            f"unknown key {name!r} {what}. Allowed keys: {', '.join(allowed) or '(none)'}.{did_you_mean(name, allowed)}",
            path=path,
            key=f"{key}.{name}" if key else str(name),
        )
        for name in table
        if name not in allowed
    ]


def validate_params(cls: type, params: dict[str, Any], *, what: str, path: str | None = None, key: str = "") -> Any:
    """Build ``cls(**params)``; report every problem, each as a ``PresetError`` of its own.

    ``what`` names the strategy in messages (e.g. "noise 'pyramid'"); ``key`` is the key path
    prefix (e.g. "noise[0]") so the error names ``noise[0].discount``. Unknown keys and every
    invalid value are reported together (``PresetErrors`` when there are several).
    """
    allowed = field_names(cls)
    prefix = f"{key}." if key else ""
    problems = unknown_key_errors(params, allowed, what=f"for {what}", path=path, key=key)
    known = {name: value for name, value in params.items() if name in allowed}
    instance = None
    try:
        instance = cls(**known)
    except pydantic.ValidationError as exc:
        reported: set[str] = set()
        for error in exc.errors():
            loc = list(error.get("loc", ()))
            field = loc[0] if loc else None
            if field not in allowed:
                problems.append(PresetError(f"invalid parameters for {what}: {_message(error)}.", path=path, key=key or None))
                continue
            # keep list indices (betas[1]), drop pydantic's union-member tags
            where = str(field) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
            if where in reported:  # a union reports each member's complaint: the first says enough
                continue
            reported.add(where)
            value = params.get(str(field), "(missing)")
            problems.append(
                PresetError(
                    f"{_toml(value)} is not allowed for {what}: {_message(error)}. Allowed: {describe_allowed(cls, str(field))}.",
                    path=path,
                    key=f"{prefix}{where}",
                )
            )
    except (TypeError, ValueError) as exc:
        # Cross-field checks in __post_init__ raise ValueError with a sentence of their own.
        problems.append(PresetError(f"invalid parameters for {what}: {exc}", path=path, key=key or None))
    raise_together(problems)
    return instance


def _message(error: Any) -> str:
    """Pydantic's sentence for one error, except for a number that is none: say what it is."""
    value = error.get("input")
    if error.get("type") == "finite_number" and isinstance(value, float):
        return f"{_toml(value)} is not a number" if math.isnan(value) else f"{_toml(value)} is not finite"
    return str(error["msg"]).removeprefix("Value error, ").rstrip(".")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)
