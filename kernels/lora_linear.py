"""
Fused LoRA linear layer
=======================

The op (Hu et al. 2021, "LoRA"), for x: (M, K), W: (N, K), b: (N,), A: (r, K), B: (N, r):

    h  = dropout(x) = x * keep / (1 - p)           keep ~ Bernoulli(1 - p), regenerated, never stored
    xa = h @ A.T                                    (M, r)   float32
    y  = x @ W.T + b + s * xa @ B.T                 (M, N)

and its backward with W and b frozen (no dW, no db), for dy: (M, N):

    dyb = s * dy @ B                                (M, r)   float32
    dx  = dy @ W + keep / (1 - p) * (dyb @ A)       (M, K)
    dA  = dyb.T @ h                                 (r, K)
    dB  = s * dy.T @ xa                             (N, r)

Design: two kernels.
(1) `_lora_mm_kernel` is the tiled GEMM of the Triton matmul tutorial, out = x @ w + b, whose epilogue
    adds the rank-r term lr_scale * (xa @ b_lr): one extra (BLOCK_M, R_PAD) @ (R_PAD, BLOCK_N) dot per
    output tile, i.e. a K -> K + r longer reduction. It gives y (forward) and dx (backward; there the
    epilogue also multiplies by the regenerated dropout mask).
(2) `_shrink_kernel` computes a thin product out = scale * x @ a.T with r <= 128 columns: xa, dyb, and
    (on transposed views) dA and dB. It reads its big operand once and keeps a (BLOCK_M, R_PAD) float32
    accumulator; when too few row blocks fill the GPU (dA, dB reduce over all M tokens) the reduction
    is split into chunks whose float32 partials are summed afterwards (deterministic, no atomics).
    Dropout is applied to x as it is loaded, from a Philox counter keyed on (row, column) of x, so no
    mask is ever stored.
Where xa (dyb) comes from is a cost trade-off, so both exist. The GEMM can accumulate it in its own
K loop from the x (dy) tiles it loads anyway (FUSE_SHRINK): no extra pass over x, no extra launch, but
each of the N / BLOCK_N column tiles redoes it, ~R_PAD / BLOCK_N more tensor-core work. A separate
`_shrink_kernel` pass costs one more read of x instead: memory-bound, ~(F / BW) / N of the GEMM's time.
Narrow outputs with a small r (R_PAD * N < 30k) take the first, the rest the second (`_fuse_shrink`):
on gemma-3-1b the forward of q/k/v/o and the dx of every projection but down for r <= 16, and k/v's
forward up to r = 64; nothing of gemma-7b or gemma-2-9b. Forward dropout always takes the second (a
Philox draw per element of x in every column tile would cost more than the GEMM).

Blocked algorithm of `_lora_mm_kernel` (one program per (BLOCK_M, BLOCK_N) tile of out):

    acc = zeros((BLOCK_M, BLOCK_N), float32)
    for k in range(0, K, BLOCK_K):
        acc += x[m : m+BLOCK_M, k : k+BLOCK_K] @ w[k : k+BLOCK_K, n : n+BLOCK_N]
        (FUSE_SHRINK: xa_acc += x[m : m+BLOCK_M, k : k+BLOCK_K] @ a[k : k+BLOCK_K, :R_PAD])
    acc += lr_scale * (keep[m, n] *) xa[m : m+BLOCK_M, :R_PAD] @ b_lr[:R_PAD, n : n+BLOCK_N]
    out[m : m+BLOCK_M, n : n+BLOCK_N] = (acc + bias[n : n+BLOCK_N]).to(out.dtype)

r is padded to R_PAD, a power of two >= 16 (tl.dot's smallest tile), with masked loads (other=0.0).
Pointer offsets are computed in int64: a transposed view (x.T for dA, dy.T for dB) steps by a whole row
of features per token, and tokens x features passes 2^31 at realistic sizes (e.g. 87k tokens of a
24576-wide gemma-7b MLP).
xa is kept in float32 and rounded to the activation dtype just before its dot, as a bf16 PyTorch
LoRA rounds its (M, r) intermediate. float64 (for gradcheck, not for speed) takes an FMA path, a
broadcast multiply and a sum in float64, rather than rely on tl.dot accepting fp64 everywhere; its
scalars (scaling, 1 / (1 - p)) still reach the kernels as float32, so float64 results are exact only
for scalars that float32 represents exactly (the gradcheck test uses 0.5 and 2).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_RANK = 128  # the (BLOCK_M, R_PAD) accumulators live in registers; larger r: plain GEMMs (lora_linear)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _keep(seed, rows, cols, p):
    """Dropout keep-mask for elements (rows, cols) of x: Philox keyed on (col, row), u >= p."""
    r = (rows + cols * 0).to(tl.uint32)  # broadcast both to the tile's shape
    c = (cols + rows * 0).to(tl.uint32)
    zero = c * 0
    rand, _, _, _ = tl.philox(seed, c, r, zero, zero)
    return tl.uint_to_uniform_float(rand) >= p


@triton.jit
def _mm(a, b, FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a (P, Q) @ b (Q, S) accumulated in float32 (float64 on the FMA path)."""
    if FP64:
        c = tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    else:
        # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot; bf16 * bf16 is exact in fp32
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


# ----------------------------------------------------------------------------------------------------
# Kernel 1: thin product out[s] = scale * dropout(x)[:, chunk s] @ a[:, chunk s].T
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not recompile
def _shrink_kernel(
    # Pointers
    x_ptr,
    a_ptr,
    out_ptr,
    # Sizes: x is (M, K), a is (R, K), out is (SPLIT, M, R); program (i, s) reduces K-chunk s
    M,
    K,
    R,
    k_per_split,
    # Strides (elements)
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_or,
    # Scale and dropout
    scale,
    seed,
    p,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    R_PAD: tl.constexpr,
    DROPOUT: tl.constexpr,  # zero x where keep(row, col) is False
    X_IS_T: tl.constexpr,  # x is the transpose of the dropout input: element (i, k) has mask coords (k, i)
    FP64: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    k_lo = pid_s * k_per_split  # k_per_split is a multiple of BLOCK_K: chunks never overlap
    rows = offs_m.to(tl.int64)[:, None] * stride_xm
    a_cols = offs_r.to(tl.int64)[None, :] * stride_ar
    if FP64:
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_k64 = offs_k.to(tl.int64)  # on x.T, offs_k * stride_xk is tokens x features: > 2^31
        x = tl.load(
            x_ptr + rows + offs_k64[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        # a^T tile: (BLOCK_K, R_PAD), in x's dtype (a may be a float32 intermediate: xa, dyb)
        a = tl.load(
            a_ptr + offs_k64[:, None] * stride_ak + a_cols,
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        ).to(x.dtype)
        if DROPOUT:
            if X_IS_T:
                keep = _keep(seed, offs_k[None, :], offs_m[:, None], p)
            else:
                keep = _keep(seed, offs_m[:, None], offs_k[None, :], p)
            x = tl.where(keep, x, 0.0).to(a.dtype)
        acc += _mm(x, a, FP64, UPCAST, PRECISION)
    acc = acc * scale
    out_ptrs = (
        out_ptr
        + pid_s.to(tl.int64) * stride_os
        + offs_m.to(tl.int64)[:, None] * stride_om
        + offs_r.to(tl.int64)[None, :] * stride_or
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------------------------------
# Kernel 2: out = x @ w + bias + lr_scale * [keep *] (xa @ b_lr)   (the base GEMM, rank-r epilogue;
#           with FUSE_SHRINK it also computes xa = shrink_scale * x @ a in its own K loop)
# ----------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not recompile
def _lora_mm_kernel(
    # Pointers
    x_ptr,
    w_ptr,
    bias_ptr,
    xa_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    # Sizes: x (M, K), w (K, N), xa (M, R), a (K, R), b_lr (R, N), out (M, N)
    M,
    N,
    K,
    R,
    m_bucket,  # next power of two >= M: only the autotuner's cache key
    # Strides (elements)
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_xam,
    stride_xar,
    stride_ak,
    stride_ar,
    stride_br,
    stride_bn,
    stride_om,
    stride_on,
    # FUSE_SHRINK: xa = shrink_scale * x @ a computed here; rank-r epilogue: scale, dropout mask
    shrink_scale,
    lr_scale,
    seed,
    p,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    FUSE_SHRINK: tl.constexpr,  # accumulate xa in the K loop (and store it from column tile 0)
    FP64: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # (1) grouped ordering: GROUP_M row-tiles share their columns of w while they sit in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    # pointer offsets in int64 (row x stride passes 2^31 on big inputs); the K loop steps by BLOCK_K
    m64, n64, k64, r64 = offs_m.to(tl.int64), offs_n.to(tl.int64), offs_k.to(tl.int64), offs_r.to(tl.int64)
    x_ptrs = x_ptr + m64[:, None] * stride_xm + k64[None, :] * stride_xk
    w_ptrs = w_ptr + k64[:, None] * stride_wk + n64[None, :] * stride_wn
    a_ptrs = a_ptr + k64[:, None] * stride_ak + r64[None, :] * stride_ar
    xa_ptrs = xa_ptr + m64[:, None] * stride_xam + r64[None, :] * stride_xar
    step_x = tl.cast(stride_xk, tl.int64) * BLOCK_K
    step_w = tl.cast(stride_wk, tl.int64) * BLOCK_K
    step_a = tl.cast(stride_ak, tl.int64) * BLOCK_K

    # (2) the base GEMM: acc (BLOCK_M, BLOCK_N) += x tile (BLOCK_M, BLOCK_K) @ w tile (BLOCK_K, BLOCK_N)
    if FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
        xa_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        xa_acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _mm(x, w, FP64, UPCAST, PRECISION)
        if FUSE_SHRINK:  # the same x tile, times a tile (BLOCK_K, R_PAD)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            xa_acc += _mm(x, a, FP64, UPCAST, PRECISION)
            a_ptrs += step_a
        x_ptrs += step_x
        w_ptrs += step_w

    # (3) the rank-r epilogue: (BLOCK_M, R_PAD) @ (R_PAD, BLOCK_N), xa rounded to the activation dtype
    mask_mr = mask_m[:, None] & mask_r[None, :]
    if FUSE_SHRINK:
        xa = xa_acc * shrink_scale
        if pid_n == 0:  # one column tile writes xa for backward
            tl.store(xa_ptrs, xa.to(xa_ptr.dtype.element_ty), mask=mask_mr)
    else:
        xa = tl.load(xa_ptrs, mask=mask_mr, other=0.0)
    b = tl.load(
        b_ptr + r64[:, None] * stride_br + n64[None, :] * stride_bn,
        mask=mask_r[:, None] & mask_n[None, :],
        other=0.0,
    )
    low_rank = _mm(xa.to(b.dtype), b, FP64, UPCAST, PRECISION)
    if DROPOUT:
        low_rank = tl.where(_keep(seed, offs_m[:, None], offs_n[None, :], p), low_rank, 0.0)
    acc += low_rank * lr_scale
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n64, mask=mask_n, other=0.0).to(acc.dtype)[None, :]  # contiguous

    # (4) one cast at the end
    out_ptrs = out_ptr + m64[:, None] * stride_om + n64[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not recompile
def _mask_kernel(out_ptr, M, K, seed, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialise keep (M, K) as int8: for tests and for anyone who wants to see the mask."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = _keep(seed, offs_m[:, None], offs_k[None, :], p)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    # triton.jit decides at decoration time (TRITON_INTERPRET=1 when this module was imported)
    return "Interpreted" in type(_lora_mm_kernel).__name__


# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the fused GEMM on a recent GPU.
# Tensor-core path (16-bit inputs, float32 with TF32 allowed): the Triton matmul tutorial's configs,
# autotuned, plus a small one that fits in shared memory in every case (98 KB at worst: float32,
# in-loop shrink, R_PAD = 128) and gives small-N shapes (k/v, N = 256) more tiles.
_FALLBACK_CONFIG = (64, 64, 32, 3, 4)
_MM_CONFIGS = [
    (128, 256, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 3, 8),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    _FALLBACK_CONFIG,
]
# float32 without TF32 ("ieee", PyTorch's default) is an FMA loop on every GPU: big tensor-core tiles
# buy nothing there and take seconds each to compile, so one config, no autotuning. Likewise for
# problems of a few rows (M <= 64): autotuning a 37-row GEMM is pointless, one compile is enough.
_FMA_CONFIG = _FALLBACK_CONFIG
_TINY_M, _TINY_CONFIG = 64, (32, 64, 32, 2, 4)
_SMEM_H100 = 232_448  # bytes of shared memory a block may use on sm_90 (227 KB)


def _smem_bytes(bm: int, bn: int, bk: int, stages: int, r_pad: int, fuse: bool, elsize: int) -> int:
    """Shared memory of a tensor-core config: num_stages buffered tiles of x (BM, BK) and w (BK, BN), and
    with the in-loop shrink a (BK, R_PAD) tile of a. The epilogue reuses these buffers. Equal to the
    compiled kernels' metadata.shared on sm_90 for every config above (bf16 and fp32, R_PAD 16..128)."""
    return stages * (bm * bk + bk * bn + (bk * r_pad if fuse else 0)) * elsize


@functools.cache
def _smem_limit(device_index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # another Triton's driver API: assume an H100
        return _SMEM_H100


def _fitting(configs, r_pad: int, fuse: bool, elsize: int, limit: int) -> list:
    """The configs whose tiles fit in `limit` bytes of shared memory; never empty (else the smallest)."""
    smem = lambda c: _smem_bytes(
        c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, r_pad, fuse, elsize
    )
    return [c for c in configs if smem(c) <= limit] or [min(configs, key=smem)]


def _prune_by_smem(configs, named_args, **meta):
    """early_config_prune: drop the configs that do not fit in the device's shared memory (the autotuner
    would compile them only to score them as failed, and raise if none were left)."""
    x = named_args["x_ptr"]
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _fitting(configs, meta["R_PAD"], meta["FUSE_SHRINK"], x.element_size(), _smem_limit(device))


def _config(bm, bn, bk, stages, warps) -> triton.Config:
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_stages=stages, num_warps=warps
    )


@functools.cache
def _autotuned_mm(direction: str):
    """One autotuner per call site ("fwd": x @ W.T, "bwd": dy @ W): their memory layouts differ."""
    del direction  # only separates the caches
    # keyed on M rounded up to a power of two, not M: a new sequence length must not re-tune
    return triton.autotune(
        configs=[_config(*c) for c in _MM_CONFIGS],
        key=["m_bucket", "N", "K", "R_PAD", "FUSE_SHRINK"],
        prune_configs_by={"early_config_prune": _prune_by_smem},
    )(_lora_mm_kernel)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _tf32_allowed() -> bool:
    """Whether the user allowed TF32 for float32 CUDA matmuls, through either of PyTorch's APIs."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:  # torch >= 2.9 refuses to read the legacy flag once fp32_precision was set
        precision = getattr(matmul, "fp32_precision", "ieee")
        if precision == "none":  # inherited from the global setting
            precision = getattr(torch.backends, "fp32_precision", "ieee")
        return precision == "tf32"


def _common_meta(dtype: torch.dtype, interpreting: bool) -> dict:
    if dtype == torch.float32 and not _tf32_allowed():
        precision = "ieee"  # PyTorch's float32 matmul default; tf32 only where the user allowed it
    else:
        precision = "tf32"  # ignored for 16-bit inputs
    return dict(
        FP64=dtype == torch.float64, UPCAST=interpreting and dtype == torch.bfloat16, PRECISION=precision
    )


def _shrink(x, a, scale, *, seed=0, p=0.0, dropout=False, x_is_t=False, transpose_out=False):
    """scale * dropout(x) @ a.T for x (M, K), a (R, K) (any strides) -> (M, R) float32 (float64 for
    float64 x), or (R, M) with transpose_out."""
    (M, K), R = x.shape, a.shape[0]
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if M == 0 or K == 0:  # no rows, or an empty sum (dA and dB of zero tokens): nothing to launch
        return torch.zeros((R, M) if transpose_out else (M, R), device=x.device, dtype=acc_dtype)
    interpreting = _interpreting()
    r_pad = _r_pad(R)
    if interpreting:  # small tiles, a pretend 4-SM machine: the tests cross tile and split boundaries
        block_m, block_k, warps, sms, min_chunk = 32, 16, 4, 4, 16
    else:
        sms = _num_sms(x.device.index)
        if x.dtype == torch.float64:
            block_m, block_k, warps, min_chunk = 32, 8, 4, 256
        else:  # memory-bound: enough row blocks to keep every SM streaming x
            block_k = 64 if r_pad <= 64 else 32
            block_m = 64 if triton.cdiv(M, 64) >= sms else 32
            warps, min_chunk = 4, 512
    # Split the reduction only where the row blocks leave most SMs idle (dA and dB reduce over all M
    # tokens): float32 partials, summed afterwards by torch (deterministic, one extra launch).
    row_blocks = triton.cdiv(M, block_m)
    split = 1 if 2 * row_blocks >= sms else min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(K, min_chunk))
    k_per_split = triton.cdiv(triton.cdiv(K, split), block_k) * block_k
    split = triton.cdiv(K, k_per_split)
    if transpose_out:
        out = torch.empty(split, R, M, device=x.device, dtype=acc_dtype)
        stride_os, stride_om, stride_or = out.stride(0), out.stride(2), out.stride(1)
    else:
        out = torch.empty(split, M, R, device=x.device, dtype=acc_dtype)
        stride_os, stride_om, stride_or = out.stride()
    _shrink_kernel[(row_blocks, split)](
        x, a, out,
        M, K, R, k_per_split,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), stride_os, stride_om, stride_or,
        float(scale), seed, float(p),
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=r_pad, DROPOUT=dropout, X_IS_T=x_is_t,
        num_warps=warps, num_stages=3, **_common_meta(x.dtype, interpreting),
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0)


def _lora_mm(
    x, w, bias, b_lr, lr_scale, *, direction, xa=None, a=None, shrink_scale=1.0, seed=0, p=0.0, dropout=False
):
    """out = x (M, K) @ w (K, N) + bias + lr_scale * [keep *] xa (M, R) @ b_lr (R, N), in x.dtype.

    Either xa is given, or a (K, R) is and xa = shrink_scale * x @ a is computed in the same K loop.
    Returns (out, xa)."""
    (M, K), N = x.shape, w.shape[1]
    R = b_lr.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    fuse = a is not None
    if fuse:
        acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xa = torch.empty(M, R, device=x.device, dtype=acc_dtype)
    if out.numel() == 0:  # nothing to launch (xa of a zero-width layer is the empty sum)
        return out, xa.zero_() if fuse else xa
    interpreting = _interpreting()
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with stride 1
    a_ = a if fuse else b_lr  # a placeholder pointer when unused
    args = (
        x, w, x if bias is None else bias, xa, a_, b_lr, out,
        M, N, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), xa.stride(0), xa.stride(1),
        a_.stride(0), a_.stride(1), b_lr.stride(0), b_lr.stride(1), out.stride(0), out.stride(1),
        float(shrink_scale), float(lr_scale), seed, float(p),  # float32 scalars, also for float64 x
    )  # fmt: skip
    meta = dict(R_PAD=_r_pad(R), HAS_BIAS=bias is not None, DROPOUT=dropout, FUSE_SHRINK=fuse)
    meta.update(_common_meta(x.dtype, interpreting))
    # one config, no autotuning: the interpreter runs programs one by one; fp64 is for gradcheck, not
    # speed; float32 "ieee" is an FMA loop; a few rows are not worth tuning (see _FMA_CONFIG)
    if interpreting:
        config = (32, 32, 16, 1, 4)
    elif x.dtype == torch.float64:
        config = (32, 32, 8, 3, 4)
    elif M <= _TINY_M:
        config = _TINY_CONFIG
    elif meta["PRECISION"] == "ieee" and x.dtype == torch.float32:
        config = _FMA_CONFIG
    else:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _autotuned_mm(direction)[grid](*args, **meta)
        return out, xa
    bm, bn, bk, stages, warps = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _lora_mm_kernel[grid](
        *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=stages, num_warps=warps, **meta
    )
    return out, xa


# Where to compute the rank-r shrink (xa = x @ A.T forward, dyb = dy @ B backward): inside the GEMM's K
# loop, every one of the N / BLOCK_N column tiles redoes it, ~R_PAD / BLOCK_N (BLOCK_N ~ 128) more
# tensor-core work; as a separate pass it costs one more read of x, memory-bound, ~(F / BW) / N of the
# GEMM's time (F / BW ~ 230 flop/byte on an H100). The in-loop form wins when R_PAD * N < 128 * 230.
_FUSE_SHRINK_BELOW = 30_000


def _fuse_shrink(r: int, n_out: int) -> bool:
    return _r_pad(r) * n_out < _FUSE_SHRINK_BELOW


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class LoRALinearFunction(torch.autograd.Function):
    """y = x @ W.T + b + s * dropout(x) @ A.T @ B.T; saves x, W, A, B and xa (M, r), nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, fuse_shrink):
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        r, drop = lora_A.shape[0], dict(seed=seed, p=p, dropout=p > 0)
        # xa (M, r) = dropout(x) @ A.T, float32; in the GEMM's K loop only without dropout, which would
        # cost a Philox draw per element of x in every column tile
        fuse = p == 0 and (_fuse_shrink(r, weight.shape[0]) if fuse_shrink is None else fuse_shrink)
        if fuse:
            y, xa = _lora_mm(x2, weight.t(), bias, lora_B.t(), scaling, a=lora_A.t(), direction="fwd")
        else:
            xa = _shrink(x2, lora_A, 1.0 / (1.0 - p), **drop)
            y, _ = _lora_mm(x2, weight.t(), bias, lora_B.t(), scaling, xa=xa, direction="fwd")  # (M, N)
        ctx.save_for_backward(x2, weight, lora_A, lora_B, xa)
        ctx.scaling, ctx.p, ctx.seed, ctx.x_shape, ctx.fuse_shrink = scaling, p, seed, x.shape, fuse_shrink
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, xa = ctx.saved_tensors
        s, p, keep_scale = ctx.scaling, ctx.p, 1.0 / (1.0 - ctx.p)
        drop = dict(seed=ctx.seed, p=p, dropout=p > 0)  # regenerates the forward's mask
        need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        dx = dA = dB = dyb = None
        # dx (M, K) = dy @ W + keep / (1 - p) * dyb @ A, with dyb (M, r) = s * dy @ B, float32, computed
        # in the same K loop (its dropout mask is applied to dx's tile, so fusing is always possible)
        fuse = ctx.fuse_shrink if ctx.fuse_shrink is not None else _fuse_shrink(lora_A.shape[0], x2.shape[1])
        if need_x and fuse:
            dx, dyb = _lora_mm(
                dy2, weight, None, lora_A, keep_scale, a=lora_B, shrink_scale=s, direction="bwd", **drop
            )
        elif need_x or need_A:
            dyb = _shrink(dy2, lora_B.t(), s)
            if need_x:
                dx, _ = _lora_mm(dy2, weight, None, lora_A, keep_scale, xa=dyb, direction="bwd", **drop)
        if need_A:
            # (r, K) = dyb.T @ dropout(x): a reduction over the M tokens of x.T (K, M) and dyb.T (r, M)
            dA = _shrink(x2.t(), dyb.t(), keep_scale, x_is_t=True, transpose_out=True, **drop).to(
                lora_A.dtype
            )
        if need_B:
            dB = _shrink(dy2.t(), xa.t(), s).to(lora_B.dtype)  # (N, r) = s * dy.T @ xa
        dx = None if dx is None else dx.view(ctx.x_shape)
        return dx, None, None, dA, dB, None, None, None, None


def _draw_seed() -> int:
    # From torch's CPU generator: reproducible under torch.manual_seed, no device sync, and replayed by
    # activation checkpointing (which restores the CPU RNG state before recomputing).
    return int(torch.randint(0, 2**31 - 1, ()).item())


def lora_linear(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False, *, seed=None, fuse_shrink=None
):
    """y = x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T with fused Triton kernels.

    x: (..., in); weight: (out, in), frozen; bias: (out,) or None, frozen; lora_A: (r, in);
    lora_B: (out, r); all of x's dtype (float16, bfloat16, float32 or float64) and device. Dropout
    is applied when training and dropout_p > 0; its mask comes from `seed` (drawn from torch's RNG
    when None) and is regenerated in backward. Gradients flow to x, lora_A and lora_B only.
    fuse_shrink: compute x @ A.T (dy @ B) inside the GEMM's K loop (True) or as a separate pass
    (False); None decides by shape (see _fuse_shrink). Forward dropout always takes the separate pass.
    r > MAX_RANK (128) is computed with plain GEMMs (cuBLAS) and the same dropout mask.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # What F.linear does under autocast: every operand in the autocast dtype; the kernels then run
        # with autocast off (their backward has no autocast-affected op).
        dtype = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        with torch.autocast(x.device.type, enabled=False):
            args = map(cast, (x, weight, bias, lora_A, lora_B))
            return lora_linear(*args, scaling, dropout_p, training, seed=seed, fuse_shrink=fuse_shrink)
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    p = float(dropout_p) if training else 0.0
    if p > 0 and seed is None:
        seed = _draw_seed()
    if lora_A.shape[0] > MAX_RANK:
        # Not thin any more: the rank-r products are ordinary GEMMs, left to cuBLAS (same mask).
        keep = dropout_mask(seed, (x.numel() // x.shape[-1], x.shape[-1]), p, x.device) if p > 0 else None
        h = x if keep is None else x * keep.view(x.shape) / (1.0 - p)
        return F.linear(x, weight, bias) + scaling * F.linear(F.linear(h, lora_A), lora_B)
    return LoRALinearFunction.apply(
        x, weight, bias, lora_A, lora_B, float(scaling), p, int(seed or 0), fuse_shrink
    )


def dropout_mask(seed: int, shape: tuple[int, int], p: float, device="cuda") -> torch.Tensor:
    """The keep-mask (M, K) (bool) that lora_linear uses for `seed` on an (M, K) input (leading dims
    of x flattened into M). Materialised by the same device function the kernels call."""
    M, K = shape
    out = torch.empty(M, K, dtype=torch.int8, device=device)
    if out.numel():
        _mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 32))](
            out, M, K, int(seed), float(p), BLOCK_M=32, BLOCK_K=32
        )
    return out.bool()


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    tensors = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    if bias is not None:
        tensors["bias"] = bias
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear: x has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    for name, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(
                f"lora_linear: {name} is {t.dtype} but x is {x.dtype}; cast it to x.dtype first "
                "(LoRALinear casts lora_A/lora_B with .to(x.dtype))"
            )
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"lora_linear runs Triton kernels: it needs CUDA tensors, got {x.device}. On CPU, set "
            "TRITON_INTERPRET=1 before importing minilora.kernels (slow; for tests), or use "
            'minilora.set_backend("torch")'
        )
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"lora_linear: need x (..., in) and weight (out, in); got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    n_out, n_in = weight.shape
    if x.shape[-1] != n_in:
        raise ValueError(
            f"lora_linear: x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {n_in}"
        )
    if lora_A.dim() != 2 or lora_A.shape[1] != n_in:
        raise ValueError(f"lora_linear: lora_A must be (r, in={n_in}), got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if tuple(lora_B.shape) != (n_out, r):
        raise ValueError(f"lora_linear: lora_B must be (out={n_out}, r={r}), got {tuple(lora_B.shape)}")
    if r < 1:
        raise ValueError("lora_linear: rank r must be >= 1, got an empty lora_A")
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"lora_linear: bias must be (out={n_out},), got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "lora_linear keeps the base weight and bias frozen and returns no gradient for them; "
            "call weight.requires_grad_(False) (LoRALinear does)"
        )
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not math.isfinite(scaling):
        raise TypeError(f"lora_linear: scaling must be a finite Python number, got {scaling!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")
