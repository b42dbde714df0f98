"""One config engine for every lowbit YAML (training runs, QAT schemes, `lowbit generate`).

A schema is a tree of dataclasses whose fields are declared with `option(default, help=...)`:
the annotation is the type (``Literal[...]`` for a closed set of choices, ``X | None``,
``list[X]``, a nested dataclass), the metadata carries the help text and numeric bounds.
`build` turns a YAML tree into that schema (unknown keys fail naming the closest valid key,
wrong types and out-of-range values fail naming key, expectation and value), `validate` runs
each section's own `validate(where)` checks — which may only raise — and `show` prints the
resolved config with its defaults and help text.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path

import yaml

from lowbit.errors import ConfigError
from lowbit.utils.io import read_yaml

_BOUNDS = (("gt", ">", lambda v, b: v > b), ("ge", ">=", lambda v, b: v >= b),
           ("lt", "<", lambda v, b: v < b), ("le", "<=", lambda v, b: v <= b))


def option(default=dataclasses.MISSING, *, help: str, default_factory=dataclasses.MISSING, gt=None, ge=None,
           lt=None, le=None):
    """A config field: its default, a one-line help text, optional numeric bounds (checked on build)."""
    meta = {"help": help, **{k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def help_of(field: dataclasses.Field) -> str:
    return field.metadata.get("help", "")


def choices(tp) -> tuple | None:
    """The allowed values of a Literal annotation (also inside `X | None` and `list[X]`)."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    for arm in typing.get_args(tp):
        found = choices(arm)
        if found:
            return found
    return None


def type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(map(str, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """The value as type `tp`, or a ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in (a for a in arms if a is not type(None)):
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}' expects {type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or (isinstance(value, bool) and not all(isinstance(a, bool) for a in allowed)):
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # a single item written without brackets
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        return [_coerce(v, inner, key) for v in value]
    if tp is float:
        if isinstance(value, str):  # PyYAML reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' expects {type_name(tp)}, got {value!r}")


def _check_bounds(value, field: dataclasses.Field, key: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    for name, sign, ok in _BOUNDS:
        bound = field.metadata.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"config key '{key}' must be {sign} {bound}, got {value!r}")


def _dataclass_arm(tp):
    """The dataclass in an `X` or `X | None` annotation (optional sections such as qat.weight)."""
    if dataclasses.is_dataclass(tp):
        return tp
    arms = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
    return arms[0] if len(arms) == 1 else None


def _suggest(key: str, names: list[str], aliases: dict[str, str]) -> str | None:
    known = {a: n for a, n in aliases.items() if n in names}
    close = difflib.get_close_matches(key, names + list(known), n=1, cutoff=0.6)
    return known.get(close[0], close[0]) if close else None


def build(cls, tree: dict | None, where: str = "", aliases: dict[str, str] | None = None):
    """The schema `cls` from a (YAML) tree; nothing is defaulted silently that the tree names wrongly."""
    aliases = aliases or getattr(cls, "ALIASES", {})
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(tree).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in tree.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            close = _suggest(key, list(fields), aliases)
            prefix = f"{where}." if where else ""
            hint = f"; did you mean '{prefix}{close}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        sub = _dataclass_arm(tp)
        if sub is not None and (value is not None or tp is sub):
            kwargs[key] = build(sub, value, full, aliases)
            continue
        kwargs[key] = _coerce(value, tp, full)
        _check_bounds(kwargs[key], fields[key], full)
    return cls(**kwargs)


def apply_override(tree: dict, item: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into the nested tree, in place."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=10)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    node = tree
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: '{p}' is not a section")
    node[parts[-1]] = value


def read_tree(path: str | Path | None, overrides=()) -> dict:
    """The YAML file (if any) with `key=value` overrides applied."""
    tree = read_yaml(path) if path is not None else {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections, got {type(tree).__name__}")
    for item in overrides:
        apply_override(tree, item)
    return tree


def _sections(cfg, where: str = ""):
    """(path, section) for every dataclass in the tree, children before their parent."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            yield from _sections(v, f"{where}.{f.name}" if where else f.name)
    yield where, cfg


def validate(cfg, where: str = ""):
    """Run every section's `validate(where)`; a check that changes the config is a bug, refused here."""
    before = copy.deepcopy(cfg)
    for path, section in _sections(cfg, where):
        check = getattr(section, "validate", None)
        if check is not None:
            check(path)
    if cfg != before:
        raise AssertionError("a config validate() method changed the config; checks must only raise")
    return cfg


def load(cls, path: str | Path | None, overrides=()):
    """File + overrides → validated `cls`."""
    return validate(build(cls, read_tree(path, overrides)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _scalar(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def show(cfg, indent: int = 0) -> str:
    """The resolved config as YAML, each key with its help text, allowed values and (when changed) default."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    pad = "  " * indent
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            doc = (type(v).__doc__ or "").strip().splitlines()
            lines.append(f"{pad}{f.name}:" + (f"  # {doc[0]}" if doc and not doc[0].startswith(type(v).__name__)
                                              else ""))
            lines.append(show(v, indent + 1))
            continue
        note = [help_of(f)] if help_of(f) else []
        allowed = choices(hints[f.name])
        if allowed:
            note.append("one of: " + ", ".join(map(str, allowed)))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and default != v:
            note.append(f"default: {_scalar(default)}")
        body = f"{pad}{f.name}: {_scalar(v)}"
        lines.append(body + (f"  # {'; '.join(note)}" if note else ""))
    return "\n".join(lines)
