"""The package's shape: layers only import downwards, no import cycles, no oversized modules.

The layer contract lives in pyproject.toml ([tool.importlinter]); it counts function-local
imports too, so a lazy import cannot hide a layer violation or a cycle.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
MAX_LINES = 400


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_layer_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_layer_contract_catches_an_upward_import(tmp_path):
    """The check is live: a format module importing the export stage breaks the contract."""
    shutil.copytree(ROOT / "lowbit", tmp_path / "lowbit", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "lowbit" / "format" / "_upward.py").write_text("def f():\n    from lowbit.export import merge\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "lowbit.format._upward -> lowbit.export.merge" in r.stdout, r.stdout


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph.find_modules_directly_imported_by(w)))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles():
    assert _cycles(grimp.build_graph("lowbit", cache_dir=None)) == []


def test_cycle_finder_finds_a_cycle():
    class G:
        modules = {"a", "b", "c"}

        @staticmethod
        def find_modules_directly_imported_by(m):
            return {"a": {"b"}, "b": {"a"}, "c": {"a"}}[m]
    assert _cycles(G) == [["a", "b"]]


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT) for p in (ROOT / "lowbit").rglob("*.py")), ids=str)
def test_module_size(path):
    n = len((ROOT / path).read_text().splitlines())
    assert n <= MAX_LINES, f"{path} has {n} lines; split it by job (limit {MAX_LINES})"


def test_python_m_lowbit_works_like_the_script():
    r = subprocess.run([sys.executable, "-m", "lowbit", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "config" in r.stderr and "train" in r.stderr
