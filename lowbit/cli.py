"""`lowbit <command>`: train (more commands register here as their areas land)."""
from __future__ import annotations

import sys

COMMANDS = {"train": "lowbit.train.cli"}


def main(argv: list[str] | None = None) -> int:
    import importlib
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: lowbit {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
