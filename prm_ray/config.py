"""Typed configs: dataclasses loaded from YAML and command-line flags, validated by field name.

Every job takes `--config file.yaml` plus one flag per field (`--lr 1e-3`, nested fields with dots:
`--arith.max_steps 6`), and writes the fully resolved config next to its results, so a run can be
repeated from its output directory alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, name: str) -> Any:
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{name}' must not be null")
    if _is_dataclass_type(base):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' must be a mapping, got {value!r}")
        return from_dict(base, value, prefix=f"{name}.")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config field '{name}' must be a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(base) or (Any,)
        items = [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"config field '{name}' must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config field '{name}' must be a number, got {value!r}")
        try:
            out = base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config field '{name}' must be {base.__name__}, got {value!r}") from None
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"config field '{name}' must be an integer, got {value!r}")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config field '{name}' must be a string, got {value!r}")
        return str(value)
    if typing.get_origin(base) is typing.Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ConfigError(f"config field '{name}' must be one of {allowed}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (nested) dict; unknown keys and bad types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config field(s) {', '.join(prefix + u for u in unknown)}; "
            f"valid fields: {', '.join(prefix + f for f in fields)}"
        )
    kwargs = {}
    for k, v in data.items():
        default = _nested_default(fields[k], hints[k])
        if default is not None and isinstance(v, dict):
            # A partial mapping overrides the field's OWN default (e.g. a study's test rollouts
            # default to split=test, n=64), not the nested class's defaults.
            v = _merge(to_dict(default), v)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config{' in ' + prefix.rstrip('.') if prefix else ''}: {exc}") from exc


def _nested_default(f: dataclasses.Field, tp: Any) -> Any:
    base, _ = _unwrap_optional(tp)
    if not _is_dataclass_type(base):
        return None
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default if dataclasses.is_dataclass(f.default) else None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (the record of how a result was produced)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def _flat_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, _ = _unwrap_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out.extend(_flat_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, hints[f.name], f))
    return out


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config field '{p}' must be a mapping to set '{dotted}'")
    node[leaf] = value


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None,
               aliases: dict[str, str] | None = None) -> T:
    """`--config file.yaml` plus a flag per (nested) field; flags override the file.

    `aliases` maps extra flag names to fields (e.g. {"n": "sampling.n"}).
    """
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip())
    parser.add_argument("--config", help="YAML file with any of the fields below")
    dests: dict[str, str] = {}
    for dotted, tp, f in _flat_fields(cls):
        dest = dotted.replace(".", "__")
        dests[dest] = dotted
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        names = [f"--{dotted}"]
        if "_" in dotted:
            names.append(f"--{dotted.replace('_', '-')}")
        for alias, target in (aliases or {}).items():
            if target == dotted:
                names.append(f"--{alias}")
        is_bool = _unwrap_optional(tp)[0] is bool
        parser.add_argument(*names, dest=dest, default=None, metavar="V",
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=f"({getattr(tp, '__name__', str(tp))}, default {default})")
    args = parser.parse_args(argv)
    data = load_yaml(args.config) if args.config else {}
    for dest, dotted in dests.items():
        value = getattr(args, dest)
        if value is not None:
            if value.lower() in ("none", "null"):
                value = None
            _set_dotted(data, dotted, value)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
