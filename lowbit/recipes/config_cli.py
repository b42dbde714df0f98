"""`lowbit config show CONFIG [key=value ...]`: the resolved config with its defaults and help text.

The kind of config is read off its top-level sections (teacher/generate/output: `lowbit generate`;
only `qat` or quantizer roles: a QAT scheme; anything else: a training run) or given by --kind.
"""
from __future__ import annotations

import argparse
import sys

from lowbit import config as engine
from lowbit.errors import LowbitError
from lowbit.methods.data_gen.config import GenerateConfig
from lowbit.methods.qat.config import QATConfig, from_dict
from lowbit.recipes.config import RunConfig

KINDS = {"run": RunConfig, "generate": GenerateConfig, "qat": QATConfig}
_GENERATE_KEYS = {"teacher", "generate", "output"}
_QAT_KEYS = {"weight", "activation", "kv", "kv_position", "exclude", "name", "preset"}


def guess_kind(tree: dict) -> str:
    keys = set(tree)
    if keys and keys <= _GENERATE_KEYS:
        return "generate"
    if keys == {"qat"} and isinstance(tree["qat"], dict) and set(tree["qat"]) <= _QAT_KEYS or \
            (keys and keys <= _QAT_KEYS):
        return "qat"
    return "run"


def resolve(path, overrides=(), kind: str | None = None):
    """(kind, validated config) for a YAML file plus overrides."""
    tree = engine.read_tree(path, overrides)
    kind = kind or guess_kind(tree)
    if kind == "qat":  # presets and the `qat:` wrapper are resolved as qat.resolve does
        return kind, from_dict(tree.get("qat", tree) if set(tree) == {"qat"} else tree)
    return kind, engine.validate(engine.build(KINDS[kind], tree))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lowbit config", description="Inspect lowbit YAML configs.")
    sub = ap.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print the resolved config: every key, its value, help and default")
    show.add_argument("config", nargs="?", help="YAML file (omit with --kind to see the defaults)")
    show.add_argument("overrides", nargs="*", help="key=value overrides, as on the training command line")
    show.add_argument("--kind", choices=sorted(KINDS), help="config kind (default: read off its sections)")
    a = ap.parse_args(argv)
    try:
        if a.config is None and a.kind is None:
            raise LowbitError("give a config file, or --kind run|generate|qat to print the defaults")
        kind, cfg = resolve(a.config, a.overrides, a.kind) if a.config or a.overrides else \
            (a.kind, KINDS[a.kind]())
        if a.config is None and a.kind == "qat":
            cfg = from_dict({"preset": "w4a8kv8"})
    except LowbitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"# lowbit {kind} config" + (f" from {a.config}" if a.config else " (defaults)"))
    print(engine.show(cfg))
    return 0
