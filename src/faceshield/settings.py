"""Typed method settings: declared ranges, checked when a config is built, parsed safely from ``KEY=VALUE`` text.

A config dataclass inherits :class:`Settings` and declares each bounded field with :func:`setting`::

    @dataclass
    class PGDConfig(Settings):
        epsilon: float = setting(8 / 255, "(0, 1]")
        steps: int = setting(20, "[1, inf)")

Building one with a value of the wrong type or outside its range raises :class:`SettingError` with one line
naming the setting, the value and the allowed range, before any model is loaded. A field named ``device`` is
checked against what this torch build can run on.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import operator
import re
import typing
from typing import Any

from faceshield.errors import FaceshieldError


class SettingError(FaceshieldError, ValueError):
    """A method setting has the wrong type or is out of its range."""


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\]\s)]+)\s*([\])])\s*$")


@dataclasses.dataclass(frozen=True)
class Interval:
    """``[low, high]`` with open or closed ends; written as in mathematics: ``"(0, 1]"``, ``"[1, inf)"``."""

    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = _INTERVAL.match(text)
        if not match:
            raise ValueError(f"not an interval: {text!r}")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), left == "[", right == "]", text)

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def setting(default: Any, interval: str | None = None, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with a default and the values it accepts: a numeric ``interval`` or string ``choices``."""
    if interval is not None:
        Interval.parse(interval)  # a typo in a declaration fails at import
    metadata = {"interval": interval, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not settings")
    return dataclasses.field(default=default, metadata=metadata)


class Settings:
    """Mixin of method configs: ``__post_init__`` checks every field (see :func:`check_settings`)."""

    def __post_init__(self) -> None:
        check_settings(self)


def check_settings(config: Any) -> None:
    """Check every field of a config dataclass against its type and declared range; coerce int → float.

    Raises:
        SettingError: one line naming the setting, its value and what is allowed (the caller adds the method).
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = hints[f.name]
        where = f"{f.name}={value!r}"
        if kind is bool:
            if not isinstance(value, bool):
                raise SettingError(f"{where} must be true or false")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise SettingError(f"{where} must be a whole number")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SettingError(f"{where} must be a number")
            if not math.isfinite(value):
                raise SettingError(f"{where} must be a finite number")
            object.__setattr__(config, f.name, float(value))
        elif typing.get_origin(kind) is tuple:
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise SettingError(f"{where} must be a comma-separated list of names")
        elif kind is str and not isinstance(value, str):
            raise SettingError(f"{where} must be text")
        interval = f.metadata.get("interval")
        if interval is not None and value not in Interval.parse(interval):
            raise SettingError(f"{where} is out of range; allowed: {interval}")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise SettingError(f"{where} is not allowed; choose one of: {', '.join(choices)}")
        if f.name == "device":
            check_device(value)


def check_device(device: str) -> None:
    """One clear line when ``device`` is not one this torch build and machine can run on."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SettingError(f"device={device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
            raise SettingError(f"device={device} but CUDA is not available here ({build}); "
                               "use device=cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SettingError(f"device={device} but this machine has {torch.cuda.device_count()} "
                               "CUDA device(s)")
    elif parsed.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise SettingError("device=mps but Apple's Metal backend is not available here; use cpu")
    elif parsed.type != "cpu":
        raise SettingError(f"device={device!r} is not supported; use cpu, cuda, cuda:N or mps")


# --- parsing KEY=VALUE text --------------------------------------------------------------------------------------
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def parse_number(text: str) -> float:
    """A number or simple arithmetic of numbers: ``"0.03"``, ``"8/255"``, ``"-4/255"``, ``"2*4/255"``.

    Only numbers, ``+ - * /`` and parentheses are accepted (no names, calls or powers), so nothing else can run.

    Raises:
        ValueError: not such an expression, a division by zero, or a result that is not finite.
    """

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            inner = value(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return _OPERATORS[type(node.op)](left, right)
        raise ValueError("only numbers and + - * / are allowed")

    if len(text) > 100:
        raise ValueError("too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not a number") from None
    result = value(tree.body)
    if not math.isfinite(result):
        raise ValueError("not a finite number")
    return result


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_overrides(config_classes: type | tuple[type, ...], items: tuple[str, ...] | list[str]) -> dict:
    """``KEY=VALUE`` strings → typed overrides of the fields of one config dataclass, or of several (a key is typed
    by the first config that has it). Numbers accept simple arithmetic (``8/255``), booleans true/false/yes/no/1/0,
    lists comma-separated names. Ranges are checked when the config is built (:func:`check_settings`).

    Raises:
        SettingError: one line naming the item and what was expected.
    """
    classes = config_classes if isinstance(config_classes, tuple) else (config_classes,)
    hints: dict[str, Any] = {}
    for cls in reversed(classes):
        hints.update(typing.get_type_hints(cls))
    known = sorted({f.name for cls in classes for f in dataclasses.fields(cls)})
    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise SettingError(f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}")
        kind = hints[key]
        raw = raw.strip()
        try:
            if kind is bool:
                if raw.lower() not in _TRUE + _FALSE:
                    raise ValueError()
                value: Any = raw.lower() in _TRUE
            elif kind is float:
                value = parse_number(raw)
            elif kind is int:
                number = parse_number(raw)
                if not number.is_integer():
                    raise ValueError()
                value = int(number)
            elif typing.get_origin(kind) is tuple:
                value = tuple(v.strip() for v in raw.split(",") if v.strip())
            else:
                value = raw
        except ValueError as exc:
            name = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, str(kind))
            raise SettingError(f"--set {item!r}: {key} needs {name}" + (f" ({exc})" if str(exc) else "")) from None
        overrides[key] = value
    return overrides
