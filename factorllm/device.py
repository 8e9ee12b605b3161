"""Choosing the device and the dtype a model runs in, and the thread that sets it up."""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """fn() on a short-lived thread; its result, or its exception, comes back to the caller.

    torch's CPU kernels parallelize with GNU OpenMP, which gives each thread that runs a parallel
    region its own team of worker threads and, once there are more OpenMP threads than CPUs, stops
    them spin-waiting between regions: every small op then pays a wake-up. An engine step thread
    beside a main thread that had loaded the model (and so kept its team) measured a decode step
    ~1.3-1.6x slower on 2 cores (benchmarks/decode_profile.py: main thread vs a fresh one). A
    team ends with its thread, so loading and other heavy set-up belong on a short-lived thread,
    keeping the main (HTTP) thread free of OpenMP and the engine's step thread the only team."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn()))
        except BaseException as e:  # re-raised in the caller
            result.append((False, e))
    thread = threading.Thread(target=run, name="factorllm-setup")
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # old builds without the probe
        return False


def resolve_quantization(name: str, dtype: str, device: torch.device) -> str:
    """"auto": int8 weights (factorllm/quantize.py) where the engine would otherwise run fp32 for
    want of native bf16, i.e. a CPU without it and dtype "auto"; "none" everywhere else (an
    explicit dtype, fp32 included, keeps the weights as they are)."""
    if name not in ("auto", "none", "int8"):
        raise ValueError(f"unknown quantization {name!r}: choose auto, none or int8")
    if name == "auto":
        return "int8" if device.type == "cpu" and dtype == "auto" and not cpu_has_fast_bf16() else "none"
    return name


def int8_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The activation dtype of int8 weights: the CPU's (`resolve_dtype`: bf16 where it computes
    bf16 natively, else fp32), bf16 or fp32 as asked; fp16 and other devices are refused with the
    flag to change."""
    if device.type != "cpu":
        raise ValueError("int8 weights run on CPU only: drop --quantize int8 or use --device cpu")
    if dtype in ("float16", "fp16"):
        raise ValueError(f"int8 weights run with float32 or bfloat16 activations: drop --dtype {dtype} "
                         "or --quantize int8")
    return resolve_dtype(dtype, device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return table[name]
