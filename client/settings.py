"""Settings defined once, as dataclass fields; CLI flags, TOML keys and Flower config keys are derived from them."""

from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Where a setting is chosen in a deployment: "run" settings are the coordinator's and travel to every client in
# Flower's run config; "node" settings are the data holder's own (`fedtune-client start` flags, node config).
RUN, NODE, SERVICE = "run", "node", "service"


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    key: str | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    scope: str = RUN,
    metavar: str | None = None,
    cli: bool = True,
    const: Any = None,
) -> Any:
    """A setting: a dataclass field whose metadata says how users name it.

    `key` is its public name (TOML key; default the field name), `flag` its command-line flag (default
    `--` + key with dashes; `--no-KEY` for a setting on by default), `aliases` older TOML keys still read;
    `const` is the value of the flag given without one (`--audit` for `--audit 1000`).
    """
    metadata = {
        "help": help,
        "key": key,
        "flag": flag,
        "aliases": aliases,
        "choices": choices,
        "scope": scope,
        "metavar": metavar,
        "cli": cli,
        "const": const,
    }
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def same(owner: type, name: str, **default: Any) -> Any:
    """A field that IS `owner`'s setting `name` (one definition), for another role that reads it too."""
    src = _by_name(owner)[name]
    metadata = dict(src.metadata) | {"defined_in": f"{owner.__module__}.{owner.__qualname__}.{name}"}
    if "default" in default:
        return dataclasses.field(default=default["default"], metadata=metadata)
    if src.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=src.default_factory, metadata=metadata)
    return dataclasses.field(default=src.default, metadata=metadata)


def _by_name(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def settings(cls: type, scope: str | None = None) -> list[dataclasses.Field]:
    """The user-facing settings of a dataclass (fields made with `setting` or `same`), optionally of one scope."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata and scope in (None, f.metadata["scope"])]


def key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def flower_key(f: dataclasses.Field) -> str:
    """The key in Flower's run or node config: Flower's convention is dashes."""
    return key(f).replace("_", "-")


def flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    dashed = key(f).replace("_", "-")
    return f"--no-{dashed}" if f.default is True else f"--{dashed}"


def kind(f: dataclasses.Field) -> str:
    """The field's annotation as written (a string under `from __future__ import annotations`)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def defined_in(f: dataclasses.Field, cls: type) -> str:
    """Where the setting is defined: its owner's field, even when `cls` reads it through `same`."""
    return f.metadata.get("defined_in") or f"{cls.__module__}.{cls.__qualname__}.{f.name}"


def parse_labels(text: str) -> tuple[str, ...]:
    """'a, b,c,' -> ('a', 'b', 'c'): label names in id order; empty names are dropped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """A value from TOML, a flag (a string) or Flower's config, checked and converted to the field's type."""
    t = kind(f)
    try:
        if t == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
        elif t == "int":
            if isinstance(value, str):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif t == "float":
            if isinstance(value, str | int | float) and not isinstance(value, bool) and math.isfinite(float(value)):
                return float(value)  # never inf or nan: `--budget-epsilon inf` would be no budget at all
        elif t == "str":
            if isinstance(value, str):
                return value
        elif t == "Path":
            if isinstance(value, str | Path):
                return Path(value)
        elif t == "tuple[str, ...]":
            if isinstance(value, str):
                return parse_labels(value)
            if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                return tuple(v.strip() for v in value if v.strip())
        elif t == "dict[int, float]":
            if isinstance(value, list):  # repeated ID=VALUE flags
                value = dict(_pair(f, item) for item in value)
            if isinstance(value, dict):
                return {int(k): float(v) for k, v in value.items()}
        else:
            return value
    except (TypeError, ValueError):
        pass
    expected = f.metadata.get("metavar") or _EXPECTED.get(t, t)
    raise ConfigError(f"setting {key(f)!r}: expected {expected}, got {value!r}")


_EXPECTED = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": "a string",
    "tuple[str, ...]": "a list of names",
}


def _pair(f: dataclasses.Field, item: str) -> tuple[str, str]:
    k, sep, v = item.partition("=")
    if not sep:
        raise ValueError(item)
    return k, v


def check_choices(obj: Any) -> None:
    """The one check for settings with a fixed set of values; the message names the setting's key."""
    for f in settings(type(obj)):
        choices = f.metadata["choices"]
        value = getattr(obj, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{key(f)} must be one of {', '.join(choices)}, got {value!r}")


def help_text(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    if f.metadata["choices"]:
        text += f" ({' | '.join(f.metadata['choices'])})"
    if f.default is not dataclasses.MISSING and not isinstance(f.default, bool) and f.default not in ("", (), None):
        text += f" (default {f.default:g})" if isinstance(f.default, float) else f" (default {f.default})"
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field]) -> None:
    """One flag per setting, dest = its key; values stay strings for `coerce` (absent flags are absent)."""
    for f in fields:
        if not f.metadata["cli"]:
            continue
        common = {"dest": key(f), "help": help_text(f), "default": argparse.SUPPRESS}
        if kind(f) == "bool":
            parser.add_argument(flag(f), action="store_false" if f.default is True else "store_true", **common)
        elif kind(f) == "dict[int, float]":
            parser.add_argument(flag(f), action="append", metavar=f.metadata["metavar"], **common)
        else:
            metavar = f.metadata["metavar"] or {"int": "N", "float": "X"}.get(kind(f), key(f).upper())
            if f.metadata.get("const") is not None:
                common |= {"nargs": "?", "const": str(f.metadata["const"])}
            parser.add_argument(flag(f), metavar=metavar, **common)


def from_flat(cls: type, flat: Mapping[str, Any], scope: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `cls` from settings named by their keys (TOML keys, flag dests), coerced."""
    out = {}
    for f in settings(cls, scope):
        for name in (key(f), *f.metadata["aliases"]):
            if name in flat:
                out[f.name] = coerce(f, flat[name])
                break
    return out


def to_flat(obj: Any, scope: str | None = None) -> dict[str, Any]:
    return {key(f): getattr(obj, f.name) for f in settings(type(obj), scope)}


def to_flower(obj: Any, scope: str | None = None) -> dict[str, bool | int | float | str]:
    """Flower run/node config entries for `obj`'s settings (Flower's values are scalars: names are joined by commas)."""
    out: dict[str, bool | int | float | str] = {}
    for f in settings(type(obj), scope):
        value = getattr(obj, f.name)
        out[flower_key(f)] = ",".join(value) if isinstance(value, tuple) else value
    return out


def from_flower(cls: type, config: Mapping[str, Any], scope: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `cls` from a Flower run or node config."""
    return {f.name: coerce(f, config[flower_key(f)]) for f in settings(cls, scope) if flower_key(f) in config}


def compose(
    *classes: type, first: Iterable[str] = (), scopes: tuple[str, ...] = (RUN, NODE, SERVICE)
) -> list[tuple[str, Any, dataclasses.Field]]:
    """The settings (of `scopes`) of several roles as fields of one flat dataclass, named by their keys.

    A key two roles share must be one setting (`same`); the first role's default wins. Fields named in
    `first` (required ones) come first, as dataclasses need.
    """
    first = set(first)
    seen: dict[str, tuple[str, Any, dataclasses.Field]] = {}
    owners: dict[str, str] = {}
    for cls in classes:
        for f in settings(cls):
            if f.metadata["scope"] not in scopes:
                continue
            k, origin = key(f), defined_in(f, cls)
            if k in owners:
                if owners[k] != origin:
                    raise TypeError(f"setting {k!r} is defined twice: {owners[k]} and {origin}")
                continue
            owners[k] = origin
            metadata = dict(f.metadata) | {"key": None, "defined_in": origin}
            if f.default_factory is not dataclasses.MISSING:
                new = dataclasses.field(default_factory=f.default_factory, metadata=metadata)
            else:
                new = dataclasses.field(default=f.default, metadata=metadata)
            seen[k] = (k, f.type, new)
    fields = list(seen.values())
    return sorted(fields, key=lambda item: item[0] not in first)


def load_toml(path: Path, error: type[Exception], missing: str) -> dict[str, Any]:
    """A TOML file's table, or `error` with one sentence (`missing` says what to do when there is no file)."""
    if not path.is_file():
        raise error(f"{path} does not exist; {missing}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid TOML: {err}") from None


def check_keys(data: Mapping[str, Any], cls: type, where: str, error: type[Exception]) -> None:
    """Refuse a key that names no setting of `cls` (a typo must not be silently ignored)."""
    known = {name for f in settings(cls) for name in (key(f), *f.metadata["aliases"])}
    for k in data:
        if k not in known:
            raise error(f"{where}: unknown setting {k!r}; known settings: {', '.join(sorted(known))}")
