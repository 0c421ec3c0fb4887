"""Typed configs: dataclasses loaded from YAML, dicts and (via :mod:`prm_ray.cli`) command-line flags.

Every field is documented once, where it is declared: ``param(default, "what it means")`` puts the
text in the field's ``metadata["help"]``, which the CLI's ``--help``, ``docs/config.md`` and error
messages all read. A subclass that only changes a default (``num_cpus: float = 0.5``) inherits the
base class's text. Every job writes its fully resolved config next to its results, so a run can be
repeated from its output directory alone.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

__all__ = ["ConfigError", "FieldInfo", "config_fields", "field_help", "from_dict", "load_yaml", "merge", "nest", "param",
           "save_config", "to_dict"]


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the field."""


def param(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, hidden: bool = False) -> Any:
    """A dataclass field with its documentation (``hidden``: a test hook left out of help and docs)."""
    metadata = {"help": help, "hidden": hidden}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def type_name(tp: Any) -> str:
    base, optional = unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(base))
    elif origin in (list, tuple):
        (item, *_rest) = typing.get_args(base) or (Any,)
        name = f"list[{type_name(item)}]"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _coerce(value: Any, tp: Any, name: str) -> Any:
    base, optional = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field '{name}' must not be null")
    if is_config_class(base):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config field '{name}' must be a mapping, got {value!r}")
        return from_dict(base, value, prefix=f"{name}.")
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        if isinstance(value, str):  # a flag: "1,2,4" or, as --help prints lists, "[1, 2, 4]"
            text = value.strip()
            text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            value = [v.strip() for v in text.split(",") if v.strip() != ""]
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
    if origin is typing.Literal:
        allowed = typing.get_args(base)
        if value not in allowed:
            raise ConfigError(f"config field '{name}' must be one of {allowed}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys and bad types raise ConfigError."""
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
            v = merge(to_dict(default), v)
        kwargs[k] = _coerce(v, hints[k], prefix + k)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}{exc}") from None
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid config{' in ' + prefix.rstrip('.') if prefix else ''}: {exc}") from exc


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"autoscaling.max_replicas": "4"}`` (dotted keys: flags, ``serve run`` args) -> nested mappings."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = str(dotted).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config field '{p}' must be a mapping to set '{dotted}'")
        node[leaf] = value
    return out


def _nested_default(f: dataclasses.Field, tp: Any) -> Any:
    base, _ = unwrap_optional(tp)
    if not is_config_class(base):
        return None
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default if dataclasses.is_dataclass(f.default) else None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` on top, nested mappings merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
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


# ---------------------------------------------------------------------------------------------
# Field documentation: what --help and docs/config.md print
# ---------------------------------------------------------------------------------------------


def field_help(cls: type, name: str) -> tuple[str, bool]:
    """``(help text, hidden)`` of field ``name``: from ``cls`` or, when it only overrides a default,
    from the nearest base class that documents it."""
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        f = klass.__dataclass_fields__.get(name)  # type: ignore[attr-defined]
        if f is not None and f.metadata.get("help"):
            return f.metadata["help"], bool(f.metadata.get("hidden"))
    return "", False


@dataclass(frozen=True)
class FieldInfo:
    """One leaf field of a (nested) config, with the default it really has in that position."""

    name: str  # dotted: "engine.num_gpus"
    type: Any
    default: Any  # dataclasses.MISSING: required
    help: str
    hidden: bool
    optional_section: str | None = None  # "autoscaling": this field's section is null by default


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def config_fields(cls: type, defaults: Any = None, prefix: str = "", section: str | None = None) -> list[FieldInfo]:
    """Every leaf field of ``cls``, nested fields flattened with dots.

    Defaults of nested fields are read from the *parent's* default instance (a study's
    ``test_rollouts`` has ``split: test``, whatever ``RolloutConfig``'s own default is), so help
    and docs show what a run actually gets. A nested section that is null by default (serving's
    ``autoscaling``) is listed with its class's defaults and marked ``optional_section``.
    """
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        help_text, hidden = field_help(cls, f.name)
        tp, _ = unwrap_optional(hints[f.name])
        if is_config_class(tp) and dataclasses.is_dataclass(default):
            out.extend(config_fields(tp, default, f"{prefix}{f.name}.", section))
        elif is_config_class(tp):
            leaves = config_fields(tp, None, f"{prefix}{f.name}.", section or prefix + f.name)
            if help_text and leaves:  # the section's own documentation, once, on its first field
                leaves[0] = dataclasses.replace(leaves[0], help=f"[{prefix}{f.name}: {help_text}] {leaves[0].help}")
            out.extend(leaves)
        else:
            out.append(FieldInfo(prefix + f.name, hints[f.name], default, help_text, hidden, section))
    return out
