"""Does this CPU run bfloat16 fast? The answer behind `dtype="auto"` on the CPU.

CPUs differ by two orders of magnitude here. Measured with torch 2.13 on 2 threads: an AMD EPYC
with AVX2 only ran a float32 matmul at ~89 GFLOP/s and bf16 at 0.3 (2026-11-22); an Intel Xeon
with AMX and AVX-512-BF16 ran float32 at 305 and bf16 at 2,085 (2026-11-28). So bf16 base weights
are a 1.8x faster LoRA step on the one and a ~300x slower one on the other.

The decision, taken once per process and cached:
1. torch's CPU queries: AMX tiles or AVX-512-BF16 present? Without either, oneDNN has no bf16
   matrix instructions to use: float32, without timing anything (a bf16 matmul would take seconds).
2. With one of them, a micro-benchmark of a few milliseconds confirms it: a (256, 1024) x
   (1024, 1024) matmul in both dtypes, best of 3 after a warm-up; bf16 wins when it runs at least
   BF16_SPEEDUP times float32's rate (a torch built without oneDNN's bf16 kernels, or a VM that hides
   the tiles from the kernel, has the flag and not the speed).
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger(__name__)

# bf16 must run the benchmark matmul this many times faster than float32 to be chosen: a LoRA step
# also casts activations and keeps float32 adapters, norms and loss, so a matmul barely faster in
# bf16 makes a step no faster (AMX: 6.8x the matmul rate, 1.8x the step).
BF16_SPEEDUP = 1.5
_SHAPE = (256, 1024, 1024)  # (M, K, N): 0.5 GFLOP, ~2 ms in float32 at 300 GFLOP/s


def bf16_features() -> list[str]:
    """The bf16 matrix instructions torch reports for this CPU: "AMX", "AVX-512-BF16", or none."""
    queries = (("AMX", "_is_amx_tile_supported"), ("AVX-512-BF16", "_is_avx512_bf16_supported"))
    return [name for name, query in queries if getattr(torch.cpu, query, lambda: False)()]


def matmul_gflops(dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of the benchmark matmul in `dtype` on the current threads: best of `repeats` after one
    warm-up call (oneDNN builds its kernel on the first)."""
    M, K, N = _SHAPE
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(M, K, generator=g).to(dtype), torch.randn(K, N, generator=g).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * M * K * N / best / 1e9


@functools.cache
def fast_bf16() -> tuple[bool, str]:
    """(whether bf16 base weights make this CPU faster, the reason in words). Cached: the query and
    the benchmark run once per process; `fast_bf16.cache_clear()` asks again."""
    features = bf16_features()
    level = torch.backends.cpu.get_cpu_capability()
    if not features:
        fast, why = False, f"no AMX or AVX-512-BF16 (torch's vector level {level}): bf16 matmuls are slow"
    else:
        fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        fast = bf16 >= BF16_SPEEDUP * fp32
        why = (f"{' + '.join(features)}: a bf16 matmul ran at {bf16:.0f} GFLOP/s, float32 at {fp32:.0f} "
               f"({bf16 / fp32:.1f}x; bf16 needs {BF16_SPEEDUP:g}x)")  # fmt: skip
    log.info("CPU bf16 %s: %s", "fast" if fast else "not fast", why)
    return fast, why


def auto_dtype_reason(device: str | torch.device) -> str:
    """Why dtype="auto" picks what it picks on `device`, for the command lines to print once."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"auto on {device.type}"
    fast, why = fast_bf16()
    return f"auto on the CPU: {why}; " + ("bf16 base weights, float32 adapters" if fast else "float32")
