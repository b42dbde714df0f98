"""`lowbit <command>` (or `python -m lowbit <command>`): train, generate, merge, export, estimate, config."""
from __future__ import annotations

import importlib
import sys

# command -> (module with main(argv), whether that main takes the command name as argv[0]).
# Imported lazily so `lowbit train` never pays for (or breaks on) the other subpackages.
COMMANDS = {"train": ("lowbit.recipes.cli", False), "generate": ("lowbit.methods.data_gen.cli", False),
            "merge": ("lowbit.export.cli", True), "export": ("lowbit.export.cli", True),
            "eval-gguf": ("lowbit.export.cli", True),
            "estimate": ("lowbit.estimate.cli", False), "config": ("lowbit.recipes.config_cli", False)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: lowbit {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, with_name = COMMANDS[argv[0]]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if not (e.name and module.startswith(e.name)):
            raise  # a real missing dependency inside the module: show it
        print(f"error: `lowbit {argv[0]}` is not available in this install ({module} is missing); "
              f"update lowbit or use `lowbit train`", file=sys.stderr)
        return 2
    return mod.main(argv if with_name else argv[1:])


if __name__ == "__main__":
    sys.exit(main())
