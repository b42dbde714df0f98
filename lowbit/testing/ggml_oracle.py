"""llama.cpp's reference quantizers (``ggml-quants.c``), built from the llama-cpp-python sdist and called via ctypes.

The oracle that ``lowbit.format.ggml_quants`` is checked against byte for byte. The sdist is fetched once with
``pip download --no-deps --no-binary :all: llama-cpp-python`` into ``$LOWBIT_CACHE/ggml_oracle`` (default
``~/.cache/lowbit/ggml_oracle``); ``ggml-quants.c`` plus the headers it includes are extracted and compiled with
gcc together with a small shim that defines the few ggml symbols the file needs (abort, type/row sizes, type name).
The library is cached per sdist version. Set ``LOWBIT_LLAMA_CPP_VERSION`` to pin a version, or drop any
``llama_cpp_python-*.tar.gz`` into the cache folder to work offline.

Compile flags: ``-O2 -DNDEBUG -ffp-contract=off``. NDEBUG as in llama.cpp release builds (``nearest_int`` has an
``assert``); no FMA contraction, so the float math is exactly what the C source says. llama.cpp builds
``ggml-quants.c`` into ggml-base without ``-march`` flags, so on x86-64 (no FMA in the baseline ISA) its
llama-quantize computes the same; compilers for targets with FMA in the baseline (aarch64) may contract.

``load()`` raises ``OracleUnavailable`` (with the reason) when there is no network/sdist or no C compiler; tests
turn that into ``pytest.skip``.
"""
from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import numpy as np

from lowbit.format import ggml_quants as gq

__all__ = ["GGMLOracle", "OracleUnavailable", "cache_dir", "ensure_sources", "load"]


class OracleUnavailable(RuntimeError):
    """The reference library cannot be built here (no network, no sdist, no compiler...)."""


_GGML_TYPE_ID = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9, "Q2_K": 10,
                 "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15}

# Only the files ggml-quants.c needs, plus llama-quant.cpp (the spec of lowbit.format.ggml_quants.filetypes).
_MEMBERS = re.compile(r"vendor/llama\.cpp/(ggml/include/[^/]+\.h|ggml/src/[^/]+\.h|ggml/src/ggml-quants\.c|"
                      r"ggml/src/ggml-cpu/[^/]+\.h|src/llama-quant\.cpp|src/llama-arch\.h|src/llama-model\.h)$")

_SHIM = r"""
// Definitions of the ggml symbols that ggml-quants.c references but that live in ggml.c.
#define GGML_COMMON_DECL_C
#include "ggml-common.h"
#include "ggml.h"
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "GGML_ABORT %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}

static size_t shim_block(enum ggml_type t, size_t * bsize) {
    switch (t) {
        case GGML_TYPE_F32:  *bsize = 1;      return sizeof(float);
        case GGML_TYPE_F16:  *bsize = 1;      return sizeof(ggml_half);
        case GGML_TYPE_Q4_0: *bsize = QK4_0;  return sizeof(block_q4_0);
        case GGML_TYPE_Q4_1: *bsize = QK4_1;  return sizeof(block_q4_1);
        case GGML_TYPE_Q5_0: *bsize = QK5_0;  return sizeof(block_q5_0);
        case GGML_TYPE_Q5_1: *bsize = QK5_1;  return sizeof(block_q5_1);
        case GGML_TYPE_Q8_0: *bsize = QK8_0;  return sizeof(block_q8_0);
        case GGML_TYPE_Q8_1: *bsize = QK8_1;  return sizeof(block_q8_1);
        case GGML_TYPE_Q2_K: *bsize = QK_K;   return sizeof(block_q2_K);
        case GGML_TYPE_Q3_K: *bsize = QK_K;   return sizeof(block_q3_K);
        case GGML_TYPE_Q4_K: *bsize = QK_K;   return sizeof(block_q4_K);
        case GGML_TYPE_Q5_K: *bsize = QK_K;   return sizeof(block_q5_K);
        case GGML_TYPE_Q6_K: *bsize = QK_K;   return sizeof(block_q6_K);
        case GGML_TYPE_Q8_K: *bsize = QK_K;   return sizeof(block_q8_K);
        default: ggml_abort(__FILE__, __LINE__, "shim: unsupported ggml type %d", (int) t);
    }
    return 0;
}

size_t ggml_type_size(enum ggml_type type) { size_t b; return shim_block(type, &b); }
int64_t ggml_blck_size(enum ggml_type type) { size_t b; shim_block(type, &b); return (int64_t) b; }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { size_t b; size_t s = shim_block(type, &b); return s*ne/b; }
const char * ggml_type_name(enum ggml_type type) { (void) type; return "ggml-type"; }
size_t lowbit_block_bytes(int type) { size_t b; return shim_block((enum ggml_type) type, &b); }
"""

_CFLAGS = ["-O2", "-DNDEBUG", "-ffp-contract=off", "-fno-fast-math", "-std=gnu11", "-shared", "-fPIC"]


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "lowbit"
    return base / "ggml_oracle"


def _sdist_version(path: Path) -> str:
    m = re.match(r"llama_cpp_python-(.+)\.tar\.gz$", path.name)
    return m.group(1) if m else path.name


def _find_sdist(cache: Path, version: str | None) -> Path | None:
    pattern = f"llama_cpp_python-{version}.tar.gz" if version else "llama_cpp_python-*.tar.gz"
    found = sorted(Path(p) for p in glob.glob(str(cache / pattern)))
    if not found:
        return None

    def key(p: Path):
        return tuple(int(t) if t.isdigit() else 0 for t in re.split(r"[.\-]", _sdist_version(p)))
    return max(found, key=key)


def _download_sdist(cache: Path, version: str | None) -> Path:
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(cache)]
    detail = ""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        detail = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    except (subprocess.SubprocessError, OSError) as e:
        detail = str(e)
    sdist = _find_sdist(cache, version)
    if sdist is None:
        raise OracleUnavailable(f"could not download the {spec} sdist into {cache} (offline?) {detail}; "
                                "put a llama_cpp_python-<version>.tar.gz there to build the oracle offline")
    return sdist


def ensure_sources(version: str | None = None) -> Path:
    """Folder holding ``ggml/`` and ``src/`` of llama.cpp from the (cached) sdist; downloads/extracts if needed."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    version = version or os.environ.get("LOWBIT_LLAMA_CPP_VERSION") or None
    sdist = _find_sdist(cache, version) or _download_sdist(cache, version)
    dest = cache / f"src-{_sdist_version(sdist)}"
    if (dest / ".complete").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix="extract-", dir=cache))
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                m = _MEMBERS.search(member.name)
                if m is None or not member.isfile():
                    continue
                out = tmp / m.group(1)
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (tmp / "ggml/src/ggml-quants.c").exists():
            raise OracleUnavailable(f"{sdist.name} has no vendor/llama.cpp/ggml/src/ggml-quants.c")
        (tmp / ".complete").touch()
        if dest.exists() and not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)  # a half-extracted leftover
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / ".complete").exists():  # else another process finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _build(src: Path) -> Path:
    lib = src / "libggmlq.so"
    if lib.exists():
        return lib
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise OracleUnavailable("no C compiler (gcc/cc) on PATH to build ggml-quants.c")
    shim = src / "lowbit_shim.c"
    shim.write_text(_SHIM)
    tmp_lib = src / f"libggmlq.{os.getpid()}.so"
    cmd = [cc, *_CFLAGS, "-I", str(src / "ggml/include"), "-I", str(src / "ggml/src"),
           "-I", str(src / "ggml/src/ggml-cpu"), str(src / "ggml/src/ggml-quants.c"), str(shim), "-o", str(tmp_lib),
           "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        raise OracleUnavailable(f"compiling ggml-quants.c failed: {e}") from e
    if res.returncode != 0:
        raise OracleUnavailable(f"compiling ggml-quants.c failed:\n{res.stderr[-2000:]}")
    os.replace(tmp_lib, lib)
    return lib


_F32P = ctypes.POINTER(ctypes.c_float)


class GGMLOracle:
    """ctypes wrapper of the compiled ``ggml-quants.c``."""

    def __init__(self, lib_path: Path, src: Path):
        self.path = Path(lib_path)
        self.src = Path(src)
        self.version = self.src.name.removeprefix("src-")
        self.lib = ctypes.CDLL(str(self.path))
        for t in ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_K", "q3_K", "q4_K", "q5_K", "q6_K"):
            f = getattr(self.lib, f"quantize_{t}")
            f.restype = ctypes.c_size_t
            f.argtypes = [_F32P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, _F32P]
            f = getattr(self.lib, f"quantize_row_{t}_ref")
            f.restype = None
            f.argtypes = [_F32P, ctypes.c_void_p, ctypes.c_int64]
            f = getattr(self.lib, f"dequantize_row_{t}")
            f.restype = None
            f.argtypes = [ctypes.c_void_p, _F32P, ctypes.c_int64]
        self.lib.lowbit_block_bytes.restype = ctypes.c_size_t
        self.lib.lowbit_block_bytes.argtypes = [ctypes.c_int]

    def block_bytes(self, qtype: str) -> int:
        return int(self.lib.lowbit_block_bytes(_GGML_TYPE_ID[qtype.upper()]))

    @staticmethod
    def _as_f32(w) -> np.ndarray:
        if hasattr(w, "detach"):
            w = w.detach().float().cpu().numpy()
        return np.ascontiguousarray(np.asarray(w, dtype=np.float32))

    def quantize(self, w, qtype: str, quant_weights=None, nthread: int = 1) -> np.ndarray:
        """``quantize_<type>(src, dst, nrow, n_per_row, quant_weights)``; rows split over ``nthread`` threads.

        Returns the uint8 array of shape (rows, row_bytes).
        """
        qtype = qtype.upper()
        x = self._as_f32(w)
        if x.ndim == 1:
            x = x[None]
        nrow, n = x.shape
        bs, bb = gq.BLOCK_SIZE[qtype], self.block_bytes(qtype)
        if n % bs:
            raise ValueError(f"{qtype}: row length {n} is not a multiple of {bs}")
        out = np.zeros((nrow, n // bs * bb), dtype=np.uint8)
        qw = None
        if quant_weights is not None:
            qw = self._as_f32(quant_weights).reshape(-1)
            if qw.shape[0] != n:
                raise ValueError(f"quant_weights has {qw.shape[0]} values, expected {n}")
        fn = getattr(self.lib, f"quantize_{_cname(qtype)}")
        qw_p = qw.ctypes.data_as(_F32P) if qw is not None else None

        def work(r0: int, r1: int):
            if r1 > r0:
                fn(x[r0:].ctypes.data_as(_F32P), out[r0:].ctypes.data, r1 - r0, n, qw_p)

        nthread = max(1, min(int(nthread), nrow))
        if nthread == 1:
            work(0, nrow)
        else:  # ctypes drops the GIL during the call, so threads run the C code in parallel
            edges = [nrow * i // nthread for i in range(nthread + 1)]
            threads = [threading.Thread(target=work, args=(edges[i], edges[i + 1])) for i in range(nthread)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return out

    def quantize_ref(self, w, qtype: str) -> np.ndarray:
        """``quantize_row_<type>_ref`` over the whole (rows x n) tensor."""
        qtype = qtype.upper()
        x = self._as_f32(w)
        if x.ndim == 1:
            x = x[None]
        nrow, n = x.shape
        bs, bb = gq.BLOCK_SIZE[qtype], self.block_bytes(qtype)
        out = np.zeros((nrow, n // bs * bb), dtype=np.uint8)
        getattr(self.lib, f"quantize_row_{_cname(qtype)}_ref")(x.ctypes.data_as(_F32P), out.ctypes.data, x.size)
        return out

    def dequantize(self, data, qtype: str, shape) -> np.ndarray:
        """``dequantize_row_<type>`` of the raw block bytes into a float32 array of ``shape``."""
        qtype = qtype.upper()
        raw = np.ascontiguousarray(np.asarray(data.cpu().numpy() if hasattr(data, "cpu") else data, dtype=np.uint8))
        numel = int(np.prod(shape))
        if raw.size != numel // gq.BLOCK_SIZE[qtype] * self.block_bytes(qtype):
            raise ValueError(f"{qtype}: {raw.size} bytes do not hold {numel} values")
        out = np.empty(numel, dtype=np.float32)
        getattr(self.lib, f"dequantize_row_{_cname(qtype)}")(raw.ctypes.data, out.ctypes.data_as(_F32P), numel)
        return out.reshape(shape)


def _cname(qtype: str) -> str:
    """'Q4_K' -> 'q4_K' (the C function-name spelling)."""
    return qtype[:-1].lower() + "K" if qtype.endswith("_K") else qtype.lower()


_LOCK = threading.Lock()
_ORACLE: GGMLOracle | None = None
_ERROR: OracleUnavailable | None = None


def load(version: str | None = None) -> GGMLOracle:
    """The (cached) oracle; raises ``OracleUnavailable`` saying why it cannot be built."""
    global _ORACLE, _ERROR
    with _LOCK:
        if _ORACLE is not None and version in (None, _ORACLE.version):
            return _ORACLE
        if _ERROR is not None and version is None:
            raise _ERROR
        try:
            src = ensure_sources(version)
            oracle = GGMLOracle(_build(src), src)
        except OracleUnavailable as e:
            if version is None:
                _ERROR = e
            raise
        except OSError as e:
            err = OracleUnavailable(f"could not set up the ggml oracle: {e}")
            if version is None:
                _ERROR = err
            raise err from e
        if version is None:
            _ORACLE = oracle
        return oracle
