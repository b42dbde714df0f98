"""`lowbit <command>`: train, merge, export."""
from __future__ import annotations

import sys

# command -> (module with main(argv), whether that main takes the command name as argv[0])
COMMANDS = {"train": ("lowbit.train.cli", False), "merge": ("lowbit.export.cli", True),
            "export": ("lowbit.export.cli", True)}


def main(argv: list[str] | None = None) -> int:
    import importlib
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: lowbit {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, with_name = COMMANDS[argv[0]]
    return importlib.import_module(module).main(argv if with_name else argv[1:])


if __name__ == "__main__":
    sys.exit(main())
