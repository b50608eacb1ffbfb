"""The machinery of config fields: a field declared once (:func:`doc`: its default, its documentation and what it
accepts), its :class:`FieldSpec` (the resolved type too), and the per-field checks derived from it
(:func:`field_problems`). :mod:`lmtrain.config` declares the fields and the rules that tie them together.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def doc(default, help: str, **accepts):  # noqa: A002 - "help" reads best at the call sites
    """A config field: its default, its documentation and what it accepts (see :class:`Accepts`)."""
    return field(default=default, metadata={"help": help, "accepts": Accepts(**accepts)})


@dataclass(frozen=True)
class Accepts:
    """What one field accepts besides its type. Floats must also always be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False  # None (not given) is a problem
    nonempty: bool = False  # for strings: "" is a problem (for a list of strings: any "", or no string)
    rule: Callable[[Any], list[str]] | None = None  # the value's own problems, once its type is right


@dataclass(frozen=True)
class FieldSpec:
    """One field as declared: resolved type, whether None is allowed, documentation and what it accepts."""

    section: str
    name: str
    kind: type  # bool, int, float or str
    optional: bool
    many: bool  # a list of ``kind`` is accepted too (declared as ``str | list[str]``)
    default: Any
    help: str
    accepts: Accepts

    @property
    def label(self) -> str:
        return f"[{self.section}] {self.name}"


def field_spec(section: str, f: dataclasses.Field, annotation) -> FieldSpec:
    """The spec of field ``f`` of ``section``, whose resolved annotation is ``annotation``."""
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else ()
    kind = next((a for a in args if a is not type(None)), annotation)
    many = any(typing.get_origin(a) is list for a in args)
    return FieldSpec(
        section, f.name, kind, type(None) in args, many, f.default, f.metadata["help"], f.metadata["accepts"]
    )


def field_specs(section: str, cls: type) -> dict[str, FieldSpec]:
    """Every field's spec of the section dataclass ``cls``, in declaration order (get_type_hints resolves the
    postponed annotations)."""
    hints = typing.get_type_hints(cls)
    return {f.name: field_spec(section, f, hints[f.name]) for f in dataclasses.fields(cls)}


def type_problem(spec: FieldSpec, value: Any) -> str | None:
    """What is wrong with the type of ``value`` for the field ``spec`` (None: nothing, or a None it allows)."""
    if value is None:
        return None if spec.optional else f"{spec.label}: expected {spec.kind.__name__}, got None"
    exact = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[spec.kind]

    def fits(v: Any) -> bool:
        return isinstance(v, exact) and (spec.kind is bool or not isinstance(v, bool))

    if fits(value) or (spec.many and isinstance(value, list) and all(fits(v) for v in value)):
        return None
    expected = spec.kind.__name__ + (f" or a list of {spec.kind.__name__}" if spec.many else "")
    return f"{spec.label}: expected {expected}, got {value!r} ({type(value).__name__})"


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


def field_problems(spec: FieldSpec, value: Any) -> list[str]:
    """Everything wrong with ``value`` for the field ``spec``, as declared by its type and :class:`Accepts`."""
    a, label = spec.accepts, spec.label
    if value is None:
        return [f"{label} (--{spec.name.replace('_', '-')}) is required"] if a.required else []
    bad_type = type_problem(spec, value)
    if bad_type:
        return [bad_type]
    if spec.kind is float and not math.isfinite(value):
        return [f"{label} must be a finite number, got {value}"]
    if a.nonempty and (value == "" or value == [] or (isinstance(value, list) and "" in value)):
        return [f"{label} must not be empty" + (f", got {value!r}" if isinstance(value, list) else "")]
    if a.choices is not None and value not in a.choices:
        return [f"{label} must be one of {', '.join(a.choices)}, got {value!r}"]
    if a.rule is not None and (found := a.rule(value)):
        return [f"{label}: {p}" for p in found]
    return [
        f"{label} must be {symbol} {limit}, got {value}"
        for attr, symbol, holds in _BOUNDS
        if (limit := getattr(a, attr)) is not None and not holds(value, limit)
    ]


def normalised(spec: FieldSpec, value: Any) -> Any:
    """A well-typed value as the config holds it: ints of a float field as floats; a list of one value of a
    field that takes lists as that value (the same data as before lists, so a resumed run sees no change)."""
    if spec.many and isinstance(value, list) and len(value) == 1:
        value = value[0]
    return float(value) if spec.kind is float and value is not None else value
