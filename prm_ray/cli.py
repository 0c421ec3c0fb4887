"""Command lines of the jobs and benchmarks, generated from their config dataclasses.

``--config file.yaml`` plus one flag per (nested) field, dots for nesting (``--engine.num_gpus 1``);
flags override the file. Flags are matched exactly: an abbreviated or unknown flag is an error that
names the nearest field (argparse's prefix matching would take ``--lim 3`` as ``--limit``).
``--help`` prints each field's type, its real default and its documentation.

:func:`run_job` runs a job's ``main``: a user error (a bad config, a missing file, a bad row) prints
one line naming the field, ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from prm_ray.config import (
    ConfigError,
    FieldInfo,
    config_fields,
    from_dict,
    load_yaml,
    merge,
    nest,
    type_name,
    unwrap_optional,
)

T = TypeVar("T")

__all__ = ["USER_ERRORS", "build_parser", "config_markdown", "parse_args", "root_cause", "run_job"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
"""What a job reports as one line: bad configs (ConfigError is a ValueError), bad data, missing
paths. Ray re-raises a worker's exception as a subclass of its type, so these cover stages too."""


def _default_text(info: FieldInfo) -> str:
    if info.default is dataclasses.MISSING:
        return "required"
    text = _yaml_value(info.default)
    if info.optional_section:
        return f"{text} (the {info.optional_section} section is off unless a field of it is set)"
    return text


def _yaml_value(value: Any) -> str:
    """A default as a user writes it: null, true, 0.5, 'text' (quoted, escapes shown), [1, 2]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def _flag_names(info: FieldInfo, aliases: dict[str, str]) -> list[str]:
    names = [f"--{info.name}"]
    if "_" in info.name:
        names.append(f"--{info.name.replace('_', '-')}")
    names += [f"--{alias}" for alias, target in aliases.items() if target == info.name]
    return names


def build_parser(cls: type, description: str | None = None,
                 aliases: dict[str, str] | None = None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser for ``cls`` and the map from argparse dests to dotted field names."""
    aliases = aliases or {}
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip(), allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the fields below; flags override it")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    dests: dict[str, str] = {}
    for info in config_fields(cls):
        dest = info.name.replace(".", "__")
        dests[dest] = info.name
        is_bool = unwrap_optional(info.type)[0] is bool
        text = f"({type_name(info.type)}, default {_default_text(info)}) {info.help}".strip()
        parser.add_argument(*_flag_names(info, aliases), dest=dest, default=None, metavar="V",
                            nargs="?" if is_bool else None, const="true" if is_bool else None,
                            help=argparse.SUPPRESS if info.hidden else text.replace("%", "%%"))
    return parser, dests


def _unknown_flag_error(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    flags = [a.split("=", 1)[0] for a in unknown if a.startswith("-")]
    if not flags:
        parser.error(f"unexpected argument(s): {' '.join(unknown)}")
    known = [s for a in parser._actions for s in a.option_strings]  # argparse has no public list
    hints = []
    for flag in flags:
        near = difflib.get_close_matches(flag, known, n=1, cutoff=0.5)
        hints.append(f"{flag} (did you mean {near[0]}?)" if near else flag)
    parser.error(f"unknown flag(s): {', '.join(hints)}; flags must be spelled in full (--help lists them)")


def parse_args(cls: type[T], argv: list[str] | None = None, description: str | None = None,
               aliases: dict[str, str] | None = None) -> T:
    """``--config file.yaml`` plus a flag per (nested) field; flags override the file.

    ``aliases`` maps extra flag names to fields (e.g. ``{"n": "sampling.n"}``).
    """
    parser, dests = build_parser(cls, description, aliases)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flag_error(parser, unknown)
    flags = {}
    for dest, dotted in dests.items():
        value = getattr(args, dest)
        if value is not None:
            flags[dotted] = None if value.lower() in ("none", "null") else value
    data = merge(load_yaml(args.config) if args.config else {}, nest(flags))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


def root_cause(exc: BaseException) -> str:
    """The innermost error of a (Ray-wrapped) exception, as "Type: message".

    Ray's task errors carry the worker's traceback as text; its first exception line is the
    original error (chained tracebacks print the cause first)."""
    for line in str(exc).splitlines():
        m = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): (.*)$", line)
        if m:
            return f"{m.group(1)}: {m.group(2)}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def run_job(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None, *,
            aliases: dict[str, str] | None = None, description: str | None = None) -> Any:
    """Parse ``argv`` into ``cls`` and call ``main(cfg)``.

    A user error exits with status 2 after one line on stderr (``error: <the message>``); with
    ``--debug`` it propagates with its traceback. Other exceptions always propagate.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    cfg = parse_args(cls, argv, description, aliases)
    try:
        return main(cfg)
    except USER_ERRORS as exc:
        if debug:
            raise
        message = root_cause(exc) if "Traceback" in str(exc) else str(exc).strip().splitlines()[0]
        print(f"error: {message.removeprefix('ConfigError: ')}  (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def config_markdown(cls: type, title: str, aliases: dict[str, str] | None = None) -> str:
    """A Markdown table of every flag of ``cls`` (docs/config.md is made of these)."""
    aliases = aliases or {}
    lines = [f"## {title}", "", (cls.__doc__ or "").strip(), "",
             "| flag | type | default | meaning |", "|---|---|---|---|"]
    for info in config_fields(cls):
        if info.hidden:
            continue
        flags = ", ".join(f"`{n}`" for n in _flag_names(info, aliases) if "-" not in n[2:] or n[2:] in aliases)
        default = _default_text(info).replace("|", "\\|").replace("\n", "\\n")
        lines.append(f"| {flags} | {type_name(info.type).replace('|', ' or ')} | `{default}` | "
                     f"{info.help.replace('|', '/')} |")
    return "\n".join(lines) + "\n"
