"""Experiment configs: plain dataclasses with ``smoke``/``quick``/``full`` profiles.

``--set key=value`` overrides are parsed by the field's annotated type: ``int``, ``float``,
``bool``, ``str``, ``Literal[...]``, ``X | None`` and ``tuple[X, ...]`` (comma-separated values).
Every error names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "describe_type",
    "parse_value",
]


class ConfigError(ValueError):
    """A bad config key or value (the CLI turns it into a one-line error and exit code 2)."""


@dataclass
class ExperimentConfig:
    """Fields every experiment has.

    - ``seed``: base seed; experiments derive per-arm seeds from it (``seed``, ``seed + 1``, ...).
    - ``threads``: intra-op threads for torch and BLAS during the run (1 is fastest for the many
      small models here; 0 leaves the process settings alone).
    - ``device``: ``cpu``, ``cuda`` or ``auto``.
    """

    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the field if a value is out of range."""
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = leave as is), got {self.threads}")
        if self.device.split(":")[0] not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


C = TypeVar("C", bound=ExperimentConfig)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def describe_type(tp: Any) -> str:
    """Human-readable name of an annotated type, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in args) + " or none"
    if origin is tuple:
        return f"comma-separated list of {describe_type(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse the string ``text`` as type ``tp`` for config field ``key``."""
    origin = typing.get_origin(tp)
    text = text.strip()
    bad = ConfigError(f"--set {key}={text!r}: expected {describe_type(tp)}")
    if origin is Literal:
        for choice in typing.get_args(tp):
            if str(choice) == text:
                return choice
        raise bad
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and text.lower() in ("none", "null", ""):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(key, text, a)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) != 2 or args[1] is not Ellipsis:
            raise ConfigError(f"field {key}: only tuple[X, ...] fields can be set from the command line")
        if not text:
            return ()
        try:
            return tuple(parse_value(key, part, args[0]) for part in text.split(","))
        except ConfigError:
            raise bad from None
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise bad
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise bad from None
    if tp is str:
        return text
    raise ConfigError(f"field {key}: type {tp!r} cannot be set from the command line")


def apply_overrides(config: C, overrides: Iterable[str] | Mapping[str, str]) -> C:
    """Return a copy of ``config`` with ``key=value`` overrides applied and validated."""
    hints = _hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    items = overrides.items() if isinstance(overrides, Mapping) else [_split(o) for o in overrides]
    changes: dict[str, Any] = {}
    for key, text in items:
        if key not in hints or key not in names:
            raise ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(names)}")
        changes[key] = parse_value(key, text, hints[key])
    new = dataclasses.replace(config, **changes)
    new.validate()
    return new


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value


def config_to_dict(config: ExperimentConfig) -> dict[str, Any]:
    """Config fields as JSON-ready values (tuples become lists)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config from :func:`config_to_dict` output (lists back to tuples); unknown keys
    are an error."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)} for {cls.__name__}")
    kwargs = {}
    for k, v in data.items():
        if typing.get_origin(hints[k]) is tuple and isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg
