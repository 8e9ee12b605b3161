"""Run a one-off build (GGUF conversion, factorization) in a fresh child process.

A build allocates gigabytes of temporaries (dequantized GGUF tensors, calibration activations,
least-squares systems) that the C allocator keeps in the process heap after Python has freed them:
a server that converted and factorized the default model at its first start stayed ~1 GB larger
than the same server started from the cache. A child process hands all of it back when it exits;
the caller then loads the saved result exactly as a warm start does.

The child is a fresh interpreter (`CHILD_MAIN`), not a multiprocessing worker: those re-run the
caller's `__main__` script, which breaks any script without an `if __name__ == "__main__"` guard,
and a forked OpenMP runtime can hang. The function, its arguments and its outcome travel as pickles
through a private temporary directory that only this process and its child write (model weights
never do: they go through safetensors).
"""
from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import torch

from .errors import FactorLLMError

T = TypeVar("T")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The child imports factorllm from where the parent did (a checkout on sys.path or an install)
# and nothing from the caller's working directory.
CHILD_MAIN = """
import sys
root, tmp = sys.argv[1:]
if sys.path[:1] == [""]:
    del sys.path[0]
if root not in sys.path:
    sys.path.insert(0, root)
from factorllm.child_process import run_job
run_job(tmp)
"""


def in_child_process(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in a child interpreter: its return value, or its exception raised here. `fn`
    must be a module-level function; `args` and the result must pickle."""
    root = logging.getLogger()
    # The parent's log format (a string: formatters can hold streams, which do not pickle).
    log_format = next((h.formatter._fmt for h in root.handlers if h.formatter is not None), None)
    with tempfile.TemporaryDirectory(prefix="factorllm-child-") as tmp:
        job, outcome = Path(tmp) / "job.pickle", Path(tmp) / "outcome.pickle"
        job.write_bytes(pickle.dumps((fn, args, root.level, log_format, torch.get_num_threads())))
        status = subprocess.run([sys.executable, "-c", CHILD_MAIN, str(PACKAGE_ROOT), tmp]).returncode
        if not outcome.is_file():
            raise RuntimeError(f"the child process running {fn.__qualname__} exited with status {status} "
                               "before it finished (killed, e.g. out of memory?)")
        ok, value = pickle.loads(outcome.read_bytes())
    if ok:
        return value
    raise value


def run_job(job_dir: str) -> None:
    """The child's side: run the job in `job_dir` and leave its outcome there."""
    tmp = Path(job_dir)
    fn, args, level, log_format, threads = pickle.loads((tmp / "job.pickle").read_bytes())
    logging.basicConfig(level=level, format=log_format)
    torch.set_num_threads(threads)
    try:
        outcome = (True, fn(*args))
    except FactorLLMError as e:  # the parent reports it as its own: one line, no traceback
        outcome = (False, e)
    except Exception as e:  # a bug: its traceback is only here
        traceback.print_exc()
        outcome = (False, RuntimeError(f"{fn.__qualname__} failed in a child process: {type(e).__name__}: {e}"))
    (tmp / "outcome.pickle").write_bytes(pickle.dumps(outcome))
