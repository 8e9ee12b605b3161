"""Small C kernels, built once per CPU with the system's C compiler and called through ctypes.

Plain C files (no torch headers: well under a second to compile) called through ctypes, which lets
go of the GIL. Compiled with -fopenmp, a library's libgomp dependency resolves to the libgomp that
torch has already loaded (same soname), so its parallel loops run on the calling thread's own
OpenMP team: no second team, whose threads would make libgomp stop spin-waiting (see
server/engine.py). Each library is compiled for this CPU (-march=native) into
$FACTORLLM_CACHE/kernels, keyed by its source, flags and the CPU. Without a C compiler, or where the
build fails, `library` returns None (logged once) and callers keep to torch's kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# What every kernel's source starts with: bf16 <-> fp32 as torch converts.
PRELUDE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

static inline float bf16_to_f32(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; memcpy(&u, &f, 4); u += 0x7FFFu + ((u >> 16) & 1u); return (uint16_t)(u >> 16);
}
"""
# -ffast-math: reassociated dot products and vectorized expf (every exponent is finite here).
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC")


def _cpu_key() -> str:
    """What the compiled code depends on besides its source: the CPU (-march=native)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "\n" + "\n".join(lines)


def _build(source: str, flags: list[str], out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "kernel.c", Path(tmp) / out.name
        src.write_text(PRELUDE + source)
        run = subprocess.run([cc, *flags, "-o", str(lib), str(src), "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip()[-500:]}")
        os.replace(lib, out)  # atomic: a process building the same file beside us is harmless


def _openmp_runtimes() -> set[str]:
    """The OpenMP libraries mapped into this process."""
    with open("/proc/self/maps") as maps:
        return {ln.split()[-1] for ln in maps if "libgomp" in ln or "libiomp" in ln or "libomp" in ln}


@functools.lru_cache(maxsize=None)
def library(name: str, source: str, defines: tuple[tuple[str, int], ...] = ()) -> ctypes.CDLL | None:
    """The compiled library `name` of C `source` (after `PRELUDE`, with -D `defines`), or None
    where it cannot be built or loaded here."""
    if platform.system() != "Linux":
        return None
    from .loading import cache_dir  # (loading imports model, which imports the kernels)
    flags = [*CFLAGS, *(f"-D{k}={v}" for k, v in defines)]
    key = hashlib.sha256((PRELUDE + source + " ".join(flags) + _cpu_key()).encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{name}-{key}.so"
    try:
        if not path.exists():
            _build(source, flags, path)
        lib = ctypes.CDLL(str(path))
        runtimes = _openmp_runtimes()
        if len(runtimes) > 1:
            raise RuntimeError(f"it would run on a second OpenMP runtime beside torch's: {runtimes}")
    except (OSError, RuntimeError) as e:
        log.warning("native kernel %s unavailable, using torch's: %s", name, e)
        return None
    return lib


def bf16_library(name: str, source: str, function: str, argtypes: list) -> ctypes.CDLL | None:
    """`library` for a kernel written with AVX512-BF16 intrinsics: None where this CPU (the
    compiler's -march=native) lacks them; `function` gets `argtypes` and no result."""
    lib = library(name, "#ifdef __AVX512BF16__\n#include <immintrin.h>\nint has_bf16(void) { return 1; }\n"
                  + source + "#else\nint has_bf16(void) { return 0; }\n#endif\n")
    if lib is None or not lib.has_bf16():
        return None
    fn = getattr(lib, function)
    fn.argtypes, fn.restype = argtypes, None
    return lib
