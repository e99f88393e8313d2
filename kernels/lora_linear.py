"""
Fused LoRA linear layer
=======================

The op (Hu et al. 2021, "LoRA"), for x: (M, K), W: (N, K), b: (N,), A: (r, K), B: (N, r), scaling s:

    h   = dropout(x) = keep * x / (1 - p)          keep ~ Bernoulli(1 - p), one mask per step
    xa  = h @ A.T                                  (M, r)   float32
    y   = x @ W.T + b + (s * xa) @ B.T             (M, N)

and its backward with W and b frozen (no dW, no db), for dy: (M, N):

    dyb = s * dy @ B                               (M, r)   float32
    dB  = dy.T @ (s * xa)                          (N, r)
    dx  = dy @ W + keep / (1 - p) * (dyb @ A)      (M, K)
    dA  = dyb.T @ h                                (r, K)

Design (each choice is explained here, once)
--------------------------------------------
1. Big products (x @ W.T forward, dy @ W backward) are one tiled GEMM, `_mm_kernel` (the Triton
   matmul tutorial's), whose float32 accumulator *starts* at the rank-r term, then adds the K loop:

       acc = (s * xa) @ B.T          (dx: keep / (1 - p) * dyb @ A, masked with the stored bits)
       for k in range(0, K, BLOCK_K):  acc += x[:, k:k+BK] @ W.T[k:k+BK, :]
       y = acc + b

   One (BLOCK_M, BLOCK_N) accumulator: a second one for the rank-r term made the large tiles spill
   registers inside the K loop. The rank-r term costs a K -> K + r longer reduction.
2. Thin products (r <= 128 columns) are memory-bound passes that read their big operand once:
   `_shrink_kernel` (xa = h @ A.T; dA = dyb.T @ h on x's transposed view) and `_dy_kernel` (dyb and
   dB from one read of dy). Where too few row blocks fill the GPU, the reduction is split into chunks
   whose float32 partials are summed afterwards: deterministic, no atomics.
3. In-loop shrink: when the output is a single column tile (N <= BLOCK_N, r <= 32, no dropout), the
   GEMM also accumulates xa from the x tiles it loads anyway: one launch, one read of x. With several
   column tiles each would redo it (+R_PAD / BLOCK_N tensor work), so the separate pass is used.
4. Dropout: one mask per step, drawn in the forward's shrink pass from Philox (all four 32-bit outputs
   used, one call per 4 elements) and stored as 1 bit per element (M * K / 8 bytes, 1/16 of a bf16 x);
   dx and dA read the bits. Stored rather than regenerated: regeneration would cost a Philox call per
   4 elements in each backward pass, the bits cost M * K / 8 bytes of memory, and p stays exact. The
   seed is a device tensor drawn from torch's generator on x's device: a CUDA graph draws a new one
   per replay, activation checkpointing replays it.
5. Plans (who computes what): "triton" = all of the above. "composite" = every product by cuBLAS,
   the rank-r terms accumulated into the big products' outputs (y = x @ W.T + b; y.addmm_(xa, B.T,
   alpha=s) and dx = dy @ W; dx.addmm_(g, A, alpha=s) with g = dy @ B), Triton only for the dropout
   mask. "hybrid" = the big products by cuBLAS, the thin ones by Triton (the shrink, the one-pass dy).
   Measured on an H200 with Triton 3.6 (benchmarks/RESULTS.md): this Triton GEMM runs at 0.66-0.72x
   cuBLAS' speed on Gemma's big shapes, so "composite" is the default on CUDA; the Triton thin passes
   match cuBLAS' thin GEMMs on the GPU but cost more host time per launch. A few rows (M <= 64:
   decoding) are GEMVs that cuBLAS does best, and r > 128 is no longer thin: both always take
   "composite". `_launch_config` holds every tile and split choice.
6. Adapters may stay float32 under 16-bit x: the kernels cast their tiles, and dA, dB come back in
   the adapters' dtype. float64 (for gradcheck) takes an FMA path (a broadcast multiply and a sum)
   rather than rely on tl.dot accepting fp64; its scalars still reach the kernels as float32, so it is
   exact only for scalars float32 represents exactly.
7. Pointer offsets are int64: x.T (dA) steps a whole row of features per token, and tokens x features
   passes 2^31 at realistic sizes (87k tokens of gemma-7b's 24576-wide MLP).
8. torch.compile and CUDA graphs: under torch.compile the op is the registered custom op
   `minilora::lora_fwd` / `minilora::lora_bwd` (opaque to the tracer, no graph break); eager calls
   skip the dispatcher's overhead through a torch.autograd.Function with the same implementation. The
   first call of each (shape bucket, dtype, rank) autotunes the GEMM (~7 configs; results cached on
   disk where Triton supports it): warm up once before capturing a graph.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_RANK = 128  # the (BLOCK_M, R_PAD) accumulators live in registers; larger r: cuBLAS
SMALL_M = 64  # up to this many rows (decoding): cuBLAS GEMVs
PLANS = ("triton", "hybrid", "composite")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, acc, FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a (P, Q) @ b (Q, S), accumulated in float32 (float64 on the FMA path)."""
    if FP64:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    if (
        UPCAST
    ):  # Triton's CPU interpreter multiplies bf16 bit patterns in tl.dot; bf16 * bf16 is exact in fp32
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _zeros(P: tl.constexpr, Q: tl.constexpr, FP64: tl.constexpr):
    """The (P, Q) accumulator: float32, or float64 on the FMA path."""
    if FP64:
        z = tl.zeros((P, Q), dtype=tl.float64)
    else:
        z = tl.zeros((P, Q), dtype=tl.float32)
    return z


@triton.jit
def _tile(ptr, rows, cols, stride_row, stride_col, mask_row, mask_col):
    """The masked (len(rows), len(cols)) tile at ptr[rows, cols], zeros outside, int64 offsets."""
    offs = rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    return tl.load(ptr + offs, mask=mask_row[:, None] & mask_col[None, :], other=0.0)


@triton.jit
def _keep_tile(seed, offs_m, k0, p, BM: tl.constexpr, BK: tl.constexpr):
    """The dropout keep-mask of x[offs_m, k0 : k0 + BK] (k0 a multiple of 4): element (m, k) is kept
    when output k % 4 of Philox(seed; counter (k // 4, m)) is >= p as a uniform float."""
    g = k0 // 4 + tl.arange(0, BK // 4)
    c0 = (g[None, :] + offs_m[:, None] * 0).to(tl.uint32)  # (BM, BK // 4)
    c1 = (offs_m[:, None] + g[None, :] * 0).to(tl.uint32)
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero, zero)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BM, BK))  # 4 outputs per counter
    return tl.uint_to_uniform_float(r) >= p


@triton.jit
def _store_keep(bits_ptr, keep, offs_m, k0, mask_m, stride_bits, BM: tl.constexpr, BK: tl.constexpr):
    """Store keep (BM, BK) for columns k0 : k0 + BK (k0 a multiple of 8) as bits: bit j of byte i is
    keep[:, 8 * i + j]; the rows of bits are contiguous, stride_bits = ceil(K / 8) bytes."""
    weights = (1 << tl.arange(0, 8)).to(tl.int32)
    packed = tl.sum(tl.reshape(keep.to(tl.int32), (BM, BK // 8, 8)) * weights[None, None, :], axis=2)
    offs_b = (k0 // 8 + tl.arange(0, BK // 8)).to(tl.int64)
    mask = mask_m[:, None] & (offs_b[None, :] < stride_bits)
    tl.store(
        bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_b[None, :],
        packed.to(tl.uint8),
        mask=mask,
    )


@triton.jit
def _read_keep(
    bits_ptr, offs_t, f0, stride_bits, mask_t, BT: tl.constexpr, BF: tl.constexpr, T_ROWS: tl.constexpr
):
    """keep for tokens offs_t (BT,) x features f0 : f0 + BF (f0 a multiple of 8) from the stored bits, as a
    (BT, BF) tile (T_ROWS) or its (BF, BT) transpose. One byte load per 8 elements: a load per element
    would hold a 64-bit address per element and spill the GEMM's registers."""
    offs_b = (f0 // 8 + tl.arange(0, BF // 8)).to(tl.int64)
    mask = mask_t[:, None] & (offs_b[None, :] < stride_bits)
    byte = tl.load(
        bits_ptr + offs_t.to(tl.int64)[:, None] * stride_bits + offs_b[None, :], mask=mask, other=0
    )
    byte = byte.to(tl.int32)
    shifts = tl.arange(0, 8)
    if T_ROWS:
        keep = tl.reshape((byte[:, :, None] >> shifts[None, None, :]) & 1, (BT, BF))
    else:
        keep = tl.reshape((tl.trans(byte)[:, None, :] >> shifts[None, :, None]) & 1, (BF, BT))
    return keep != 0


# ----------------------------------------------------------------------------------------------------
# Kernel 1: thin product out[s] = scale * h[:, chunk s] @ a[:, chunk s].T    (xa forward, dA backward)
# ----------------------------------------------------------------------------------------------------
# fmt: off
@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, bits_ptr, seed_ptr,  # pointers
    M, K, R, k_per_split,  # sizes: x (M, K), a (R, K), out (SPLIT, M, R); program (i, s) reduces K-chunk s
    stride_xm, stride_xk, stride_ar, stride_ak, stride_os, stride_om, stride_or, stride_bits,  # strides
    scale, p,  # output scale, dropout probability
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    MASK: tl.constexpr,  # 0: none; 1: draw keep for x (M tokens, K features), store its bits; 2: x is h's
                         # transpose (M features, K tokens): read keep from the bits
    FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # fmt: on
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m, mask_r = offs_m < M, offs_r < R
    k_lo = pid_s * k_per_split  # k_per_split is a multiple of BLOCK_K: chunks never overlap
    if MASK == 1:
        seed = tl.load(seed_ptr)
    acc = _zeros(BLOCK_M, R_PAD, FP64)
    for k0 in range(0, k_per_split, BLOCK_K):
        offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = _tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k)
        a = _tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, mask_k, mask_r).to(x.dtype)  # a.T (BLOCK_K, R_PAD)
        if MASK == 1:
            keep = _keep_tile(seed, offs_m, k_lo + k0, p, BLOCK_M, BLOCK_K)
            _store_keep(bits_ptr, keep, offs_m, k_lo + k0, mask_m, stride_bits, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, 0.0).to(a.dtype)
        if MASK == 2:  # x (BLOCK_M features, BLOCK_K tokens)
            keep = _read_keep(bits_ptr, offs_k, pid_m * BLOCK_M, stride_bits, mask_k, BLOCK_K, BLOCK_M, False)
            x = tl.where(keep, x, 0.0).to(a.dtype)
        acc = _mm(x, a, acc, FP64, UPCAST, PRECISION)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os
    out_ptrs += offs_m.to(tl.int64)[:, None] * stride_om + offs_r.to(tl.int64)[None, :] * stride_or
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------------------------------
# Kernel 2: one read of dy gives dyb[s] = scale * dy[:, chunk s] @ b[chunk s] and the partials
#           db[i] = dy[rows i, :].T @ xa_s[rows i]   (xa_s = s * xa rounded as the forward used it)
# ----------------------------------------------------------------------------------------------------
# fmt: off
@triton.jit
def _dy_kernel(
    dy_ptr, b_ptr, xa_ptr, dyb_ptr, db_ptr,  # pointers
    M, N, R, n_per_split,  # sizes: dy (M, N), b (N, R), xa (M, R); partials dyb (SPLIT, M, R), db (M_BLOCKS, N, R)
    stride_dym, stride_dyn, stride_bn, stride_br, stride_xam, stride_xar,  # strides (the partials are contiguous)
    scale, xa_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
    FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # fmt: on
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m, mask_r = offs_m < M, offs_r < R
    m64, r64 = offs_m.to(tl.int64), offs_r.to(tl.int64)
    xa = _tile(xa_ptr, offs_m, offs_r, stride_xam, stride_xar, mask_m, mask_r)
    xa = (xa * xa_scale).to(dy_ptr.dtype.element_ty)
    dyb = _zeros(BLOCK_M, R_PAD, FP64)
    for n0 in range(0, n_per_split, BLOCK_N):
        offs_n = pid_s * n_per_split + n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = _tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, mask_m, mask_n)
        b = _tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, mask_n, mask_r)
        dyb = _mm(dy, b.to(dy.dtype), dyb, FP64, UPCAST, PRECISION)
        db = _mm(tl.trans(dy), xa, _zeros(BLOCK_N, R_PAD, FP64), FP64, UPCAST, PRECISION)  # (BLOCK_N, R_PAD)
        db_ptrs = db_ptr + (pid_m.to(tl.int64) * N + offs_n.to(tl.int64)[:, None]) * R + r64[None, :]
        tl.store(db_ptrs, db.to(db_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])
    dyb_ptrs = dyb_ptr + (pid_s.to(tl.int64) * M + m64[:, None]) * R + r64[None, :]
    tl.store(dyb_ptrs, (dyb * scale).to(dyb_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


# ----------------------------------------------------------------------------------------------------
# Kernel 3: out = x @ w + bias + [keep *] (lo_scale * lo) @ b_lr      (the GEMM; see the docstring, 1.)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program in grouped order: GROUP_M row-tiles share their columns of w
    while they sit in L2 (the Triton matmul tutorial's ordering)."""
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + ((pid % num_pid_in_group) % group_size_m), (pid % num_pid_in_group) // group_size_m


@triton.jit
def _rank_r(acc, x_ptr, lo_ptr, b_ptr, offs_m, offs_n, R, stride_lom, stride_lor, stride_br, stride_bn,
            lo_scale, mask_m, mask_n, R_PAD: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """acc + (lo_scale * lo[offs_m, :R]) @ b_lr[:R, offs_n] in x's dtype (lo rounded to it first, as a
    16-bit PyTorch LoRA rounds its (M, r) intermediate), in steps of 16 ranks (the tensor cores' k): a
    whole (BLOCK_M, 128) operand would crowd the registers."""
    dtype = x_ptr.dtype.element_ty
    for r0 in tl.static_range(0, R_PAD, 16):
        offs_c = r0 + tl.arange(0, 16)
        mask_c = offs_c < R
        lo = _tile(lo_ptr, offs_m, offs_c, stride_lom, stride_lor, mask_m, mask_c)
        b = _tile(b_ptr, offs_c, offs_n, stride_br, stride_bn, mask_c, mask_n).to(dtype)
        acc = _mm((lo * lo_scale).to(dtype), b, acc, FP64, UPCAST, PRECISION)
    return acc


# fmt: off
@triton.jit
def _mm_kernel(
    x_ptr, w_ptr, bias_ptr, lo_ptr, a_ptr, b_ptr, out_ptr, bits_ptr,  # pointers
    M, N, K, R,  # sizes: x (M, K), w (K, N), lo (M, R), a (K, R), b_lr (R, N), out (M, N)
    m_bucket,  # next power of two >= M: only the autotuner's cache key
    stride_xm, stride_xk, stride_wk, stride_wn, stride_lom, stride_lor,  # strides
    stride_ak, stride_ar, stride_br, stride_bn, stride_om, stride_on, stride_bits,
    lo_scale,  # scale of the rank-r input: s (forward), 1 / (1 - p) (dx)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    R_PAD: tl.constexpr,
    LORA: tl.constexpr,  # 0: plain GEMM; 1: rank-r term from lo; 2: lo = x @ a in the K loop, stored
    KEEP: tl.constexpr,  # mask the rank-r term with the stored dropout bits (dx)
    HAS_BIAS: tl.constexpr, FP64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # fmt: on
    pid_m, pid_n = _grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m, mask_n, mask_r = offs_m < M, offs_n < N, offs_r < R
    dtype = x_ptr.dtype.element_ty

    # (1) the accumulator starts at the rank-r term (dx: masked with the stored dropout bits)
    acc = _zeros(BLOCK_M, BLOCK_N, FP64)
    if LORA == 1:
        acc = _rank_r(acc, x_ptr, lo_ptr, b_ptr, offs_m, offs_n, R, stride_lom, stride_lor, stride_br, stride_bn,
                      lo_scale, mask_m, mask_n, R_PAD, FP64, UPCAST, PRECISION)  # fmt: skip
        if KEEP:
            keep = _read_keep(bits_ptr, offs_m, pid_n * BLOCK_N, stride_bits, mask_m, BLOCK_M, BLOCK_N, True)
            acc = tl.where(keep, acc, 0.0)

    # (2) the K loop: acc += x tile (BLOCK_M, BLOCK_K) @ w tile (BLOCK_K, BLOCK_N); pointers advance
    #     by BLOCK_K (recomputing 64-bit offsets per iteration costs registers)
    k64 = offs_k.to(tl.int64)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + k64[None, :] * stride_xk
    w_ptrs = w_ptr + k64[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
    a_ptrs = a_ptr + k64[:, None] * stride_ak + offs_r.to(tl.int64)[None, :] * stride_ar
    lo = _zeros(BLOCK_M, R_PAD, FP64)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = _mm(x, w, acc, FP64, UPCAST, PRECISION)
        if LORA == 2:  # the same x tile, times a tile (BLOCK_K, R_PAD)
            a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(dtype)
            lo = _mm(x, a, lo, FP64, UPCAST, PRECISION)
            a_ptrs += tl.cast(stride_ak, tl.int64) * BLOCK_K
        x_ptrs += tl.cast(stride_xk, tl.int64) * BLOCK_K
        w_ptrs += tl.cast(stride_wk, tl.int64) * BLOCK_K

    # (3) in-loop shrink: store xa for backward (one column tile: every program owns its rows), add it
    if LORA == 2:
        lo_offs = offs_m.to(tl.int64)[:, None] * stride_lom + offs_r.to(tl.int64)[None, :] * stride_lor
        tl.store(lo_ptr + lo_offs, lo.to(lo_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])
        b = _tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, mask_r, mask_n).to(dtype)
        acc = _mm((lo * lo_scale).to(dtype), b, acc, FP64, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n.to(tl.int64), mask=mask_n, other=0.0).to(acc.dtype)[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n.to(tl.int64)[None, :] * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _bits_kernel(bits_ptr, seed_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dropout bits alone (dropout_mask, and the composite plan): the same draw as _shrink_kernel."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    keep = _keep_tile(tl.load(seed_ptr), offs_m, k0, p, BLOCK_M, BLOCK_K)
    _store_keep(bits_ptr, keep, offs_m, k0, offs_m < M, tl.cdiv(K, 8), BLOCK_M, BLOCK_K)


# ----------------------------------------------------------------------------------------------------
# Launch configuration: every tile, split and autotuning choice
# ----------------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    # triton.jit decides at decoration time (TRITON_INTERPRET=1 when this module was imported)
    return "Interpreted" in type(_mm_kernel).__name__


# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the GEMM on the tensor cores: the
# Triton matmul tutorial's, each checked spill-free for sm_90 at R_PAD = 128 (tests/test_kernels.py),
# plus a small one that fits in shared memory in every case and gives small-N shapes more tiles.
_FALLBACK_CONFIG = (64, 64, 32, 3, 4)
_MM_CONFIGS = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),  # the tutorial's 4-warp form spills with the dropout mask (255 registers)
    (64, 256, 64, 3, 8),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    _FALLBACK_CONFIG,
]
_FUSE_MAX_R_PAD = 32  # in-loop shrink: a second (BLOCK_M, R_PAD) accumulator, small enough not to spill
_SMEM_H100 = 232_448  # bytes of shared memory a block may use on sm_90 (227 KB)


def _smem_bytes(bm: int, bn: int, bk: int, stages: int, r_pad: int, fuse: bool, elsize: int) -> int:
    """Shared memory of a tensor-core config, an upper bound of what sm_90 compiles (tested):
    num_stages buffered tiles of x (BM, BK) and w (BK, BN), plus a (16, BN) step of the rank-r term,
    or with the in-loop shrink num_stages (BK, R_PAD) tiles of a and the epilogue's xa and b tiles."""
    rank_r = stages * bk * r_pad + (bm + bn) * r_pad if fuse else 16 * bn
    return (stages * (bm * bk + bk * bn) + rank_r) * elsize


def _spills(bm: int, bn: int, warps: int, r_pad: int, fuse: bool) -> bool:
    """Whether a config spills registers on sm_90: float32 accumulator elements per thread (the
    (BM, BN) tile, plus (BM, R_PAD) with the in-loop shrink) above 144, measured by compiling every
    config (tests/sm90_compile.py): 160 spilled, 144 and below did not."""
    return bm * (bn + (r_pad if fuse else 0)) > 144 * 32 * warps


@functools.cache
def _smem_limit(device_index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"])
    except Exception:  # another Triton's driver API: assume an H100
        return _SMEM_H100


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _keep_configs(configs, *, N, r_pad, fuse, elsize, limit):
    """The configs that fit in `limit` bytes of shared memory, do not spill registers and, with the
    in-loop shrink, cover N in one column tile; never empty: else the one with the least shared memory."""
    smem = lambda c: _smem_bytes(
        c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, r_pad, fuse, elsize
    )
    spills = lambda c: _spills(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, r_pad, fuse)
    ok = lambda c: smem(c) <= limit and not spills(c) and (not fuse or c.kwargs["BLOCK_N"] >= N)
    return [c for c in configs if ok(c)] or [min(configs, key=smem)]


def _prune(configs, named_args, **meta):
    """The autotuner's early_config_prune: compile and time only the configs that can run."""
    x = named_args["x_ptr"]
    device = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _keep_configs(
        configs,
        N=named_args["N"],
        r_pad=meta["R_PAD"],
        fuse=meta["LORA"] == 2,
        elsize=x.element_size(),
        limit=_smem_limit(device),
    )


def _config(bm, bn, bk, stages, warps) -> triton.Config:
    return triton.Config(
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8), num_stages=stages, num_warps=warps
    )


@functools.cache
def _autotuned_mm(direction: str):
    """One autotuner per call site ("fwd": x @ W.T, "bwd": dy @ W): their memory layouts differ."""
    del direction  # only separates the caches
    kwargs = dict(
        configs=[_config(*c) for c in _MM_CONFIGS],
        key=["m_bucket", "N", "K", "R_PAD", "LORA", "KEEP", "HAS_BIAS"],  # M rounded: no re-tune per length
        prune_configs_by={"early_config_prune": _prune},
    )
    try:
        return triton.autotune(**kwargs, cache_results=True)(_mm_kernel)  # Triton >= 3.2: cached on disk
    except TypeError:
        return triton.autotune(**kwargs)(_mm_kernel)


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
    # float32 takes tf32 only where the user allowed it (PyTorch's default is "ieee"); 16-bit ignores it
    precision = "ieee" if dtype == torch.float32 and not _tf32_allowed() else "tf32"
    return dict(
        FP64=dtype == torch.float64, UPCAST=interpreting and dtype == torch.bfloat16, PRECISION=precision
    )


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _split(blocks: int, size: int, block: int, sms: int, min_chunk: int) -> tuple[int, int]:
    """(splits, size per split): split a reduction of `size` only where `blocks` leave SMs idle."""
    split = 1 if 2 * blocks >= sms else min(triton.cdiv(2 * sms, blocks), triton.cdiv(size, min_chunk))
    per = triton.cdiv(triton.cdiv(size, max(split, 1)), block) * block
    return triton.cdiv(size, per), per


def _launch_config(kind: str, *, M: int, N: int, K: int, r_pad: int, x: torch.Tensor) -> dict:
    """Tiles, splits and warps for `kind` in ("mm", "shrink", "dy") on x's device: the one place where
    launch configurations are chosen. "mm" returns `config` (a fixed tile) or None (autotune)."""
    interp = _interpreting()
    fp64, ieee = x.dtype == torch.float64, _common_meta(x.dtype, interp)["PRECISION"] == "ieee"
    sms = (
        4
        if interp
        else _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
    )
    if kind == "mm":
        # one config, no autotuning: the interpreter runs programs one by one; float64 (gradcheck) and
        # float32 "ieee" are FMA loops where big tensor-core tiles buy nothing and compile for seconds
        if interp:
            return dict(config=(32, 32, 16, 1, 4))
        if fp64:
            return dict(config=(32, 32, 8, 3, 4))
        return dict(config=_FALLBACK_CONFIG if x.dtype == torch.float32 and ieee else None)
    if interp:  # small tiles, a pretend 4-SM machine: the tests cross tile and split boundaries
        block_m, block_k, warps, min_chunk = 32, 16, 4, 16
    elif fp64:
        block_m, block_k, warps, min_chunk = 32, 8, 4, 256
    else:  # memory-bound: wide loads, enough programs in flight to keep every SM streaming
        block_m, block_k, warps, min_chunk = 64, (128 if r_pad <= 32 else 64), 4, 512
    if kind == "shrink":  # x (M, K) reduced over K
        split, per = _split(triton.cdiv(M, block_m), K, block_k, sms, min_chunk)
        return dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=warps, num_stages=3, split=split, per=per)
    # "dy": dy (M, N) read once; its rows give dyb (reduced over N), its columns dB (reduced over M)
    block_m = 32 if interp else 128
    split, per = _split(triton.cdiv(M, block_m), N, block_k, sms, min_chunk)
    return dict(
        BLOCK_M=block_m, BLOCK_N=block_k, num_warps=4 if interp else 8, num_stages=3, split=split, per=per
    )


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _shrink(x, a, scale, *, bits=None, seed=None, p=0.0, transpose_out=False):
    """scale * h @ a.T for x (M, K), a (R, K) (any strides) -> (M, R) in the accumulation dtype, or
    (R, M) with transpose_out. seed given: h = keep * x with keep drawn and its bits stored in `bits`
    (M, K/8); bits given without seed: x is h's transpose, keep read from bits."""
    (M, K), R = x.shape, a.shape[0]
    if M == 0 or K == 0:  # no rows, or an empty sum (dA of zero tokens): nothing to launch
        return torch.zeros((R, M) if transpose_out else (M, R), device=x.device, dtype=_acc_dtype(x))
    cfg = _launch_config("shrink", M=M, N=R, K=K, r_pad=_r_pad(R), x=x)
    split = cfg.pop("split")
    out = torch.empty((split, R, M) if transpose_out else (split, M, R), device=x.device, dtype=_acc_dtype(x))
    stride_os, stride_om, stride_or = out.stride(0), *out.stride()[1:][:: -1 if transpose_out else 1]
    mask = 0 if bits is None else (1 if seed is not None else 2)
    _shrink_kernel[(triton.cdiv(M, cfg["BLOCK_M"]), split)](
        x, a, out, x if bits is None else bits, x if seed is None else seed,
        M, K, R, cfg.pop("per"),
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), stride_os, stride_om, stride_or,
        0 if bits is None else bits.stride(0),
        float(scale), float(p),
        R_PAD=_r_pad(R), MASK=mask, **cfg, **_common_meta(x.dtype, _interpreting()),
    )  # fmt: skip
    return out[0] if split == 1 else out.sum(0)


def _dy_pass(dy, lora_B, xa, s):
    """(dyb, dB) = (s * dy @ B, dy.T @ (s * xa)) from one read of dy (M, N); B (N, r), xa (M, r)."""
    (M, N), R = dy.shape, lora_B.shape[1]
    acc = _acc_dtype(dy)
    if M == 0 or N == 0:
        return torch.zeros(M, R, device=dy.device, dtype=acc), torch.zeros(N, R, device=dy.device, dtype=acc)
    cfg = _launch_config("dy", M=M, N=N, K=N, r_pad=_r_pad(R), x=dy)
    split, m_blocks = cfg.pop("split"), triton.cdiv(M, cfg["BLOCK_M"])
    dyb = torch.empty(split, M, R, device=dy.device, dtype=acc)
    db = torch.empty(m_blocks, N, R, device=dy.device, dtype=acc)
    _dy_kernel[(m_blocks, split)](
        dy, lora_B, xa, dyb, db,
        M, N, R, cfg.pop("per"),
        dy.stride(0), dy.stride(1), lora_B.stride(0), lora_B.stride(1), xa.stride(0), xa.stride(1),
        float(s), float(s),
        R_PAD=_r_pad(R), **cfg, **_common_meta(dy.dtype, _interpreting()),
    )  # fmt: skip
    return (dyb[0] if split == 1 else dyb.sum(0)), (db[0] if m_blocks == 1 else db.sum(0))


def _matmul(
    x, w, *, bias=None, lo=None, b_lr=None, lo_scale=1.0, a=None, bits=None, direction="fwd", config=None
):
    """out = x (M, K) @ w (K, N) + bias + [keep *] (lo_scale * lo (M, R)) @ b_lr (R, N), in x.dtype.
    a (K, R) given instead of lo: lo = x @ a is computed in the K loop and returned. Returns (out, lo)."""
    (M, K), N = x.shape, w.shape[1]
    R = 0 if b_lr is None else b_lr.shape[0]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    lora = 0 if b_lr is None else (2 if a is not None else 1)
    if lora == 2:
        lo = torch.empty(M, R, device=x.device, dtype=_acc_dtype(x))
    if out.numel() == 0:  # nothing to launch (lo of a zero-width layer is the empty sum)
        return out, lo.zero_() if lora == 2 else lo
    bias = None if bias is None else bias.contiguous()  # the kernel reads bias with stride 1
    lo_, a_, b_ = (t if t is not None else x for t in (lo, a, b_lr))  # placeholder pointers when unused
    args = (
        x, w, x if bias is None else bias, lo_, a_, b_, out, x if bits is None else bits,
        M, N, K, R, triton.next_power_of_2(M),
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), lo_.stride(0), lo_.stride(1),
        a_.stride(0), a_.stride(1), b_.stride(0), b_.stride(1), out.stride(0), out.stride(1),
        0 if bits is None else bits.stride(0), float(lo_scale),
    )  # fmt: skip
    meta = dict(R_PAD=_r_pad(max(R, 1)), LORA=lora, KEEP=bits is not None, HAS_BIAS=bias is not None)
    meta.update(_common_meta(x.dtype, _interpreting()))
    config = config or _launch_config("mm", M=M, N=N, K=K, r_pad=meta["R_PAD"], x=x)["config"]
    if config is None:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
        _autotuned_mm(direction)[grid](*args, **meta)
        return out, lo
    bm, bn, bk, stages, warps = config
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _mm_kernel[grid](
        *args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=stages, num_warps=warps, **meta
    )
    return out, lo


def _draw_bits(seed: torch.Tensor, M: int, K: int, p: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dropout bits (M, K/8) for `seed`, drawn as _shrink_kernel draws them."""
    bits = torch.empty(M, triton.cdiv(K, 8), dtype=torch.uint8, device=seed.device) if out is None else out
    if bits.numel():
        bm, bk = 32, 64
        _bits_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](
            bits, seed, M, K, float(p), BLOCK_M=bm, BLOCK_K=bk
        )
    return bits


def _unpack(bits: torch.Tensor, K: int) -> torch.Tensor:
    """bits (M, K/8) uint8 -> keep (M, K) bool."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :K].bool()


def _fuse_in_loop(N: int, r: int, p: float) -> bool:
    """The in-loop shrink (docstring, 3.): one column tile of the widest config, a small rank."""
    return p == 0 and _r_pad(r) <= _FUSE_MAX_R_PAD and max(c[1] for c in _MM_CONFIGS) >= N


def _plan_for(plan: str, M: int, r: int) -> str:
    return "composite" if M <= SMALL_M or r > MAX_RANK else plan


# ----------------------------------------------------------------------------------------------------
# Forward and backward (one implementation for the autograd.Function and the torch.library op)
# ----------------------------------------------------------------------------------------------------
def _device_guard(x: torch.Tensor):
    """Triton launches on the current CUDA device, not x's: make x's device current (under torchrun,
    rank k's tensors live on GPU k)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _forward(x, weight, bias, lora_A, lora_B, s, p, seed, plan, fuse):
    """x (M, K) -> (y (M, N), xa (M, r): float32 from Triton, x's dtype from cuBLAS, bits (M, K/8) or (M, 0))."""
    (M, K), dt = x.shape, x.dtype
    plan = _plan_for(plan, M, lora_A.shape[0])
    bits = torch.empty(M, triton.cdiv(K, 8) if p > 0 else 0, dtype=torch.uint8, device=x.device)
    drop = dict(bits=bits, seed=seed, p=p) if p > 0 else {}
    with _device_guard(x):
        if plan == "triton":
            if p == 0 and (fuse if fuse is not None else _fuse_in_loop(weight.shape[0], lora_A.shape[0], p)):
                y, xa = _matmul(x, weight.t(), bias=bias, b_lr=lora_B.t(), lo_scale=s, a=lora_A.t())
                return y, xa, bits  # xa in the GEMM's K loop (docstring, 3.)
            xa = _shrink(x, lora_A, 1.0 / (1.0 - p), **drop)
            y, _ = _matmul(x, weight.t(), bias=bias, lo=xa, b_lr=lora_B.t(), lo_scale=s)
            return y, xa, bits
        if plan == "composite":
            h = x if p == 0 else x * _unpack(_draw_bits(seed, M, K, p, out=bits), K) / (1 - p)
            xa = F.linear(h, lora_A.to(dt))
        else:  # hybrid: the thin product by Triton (the dropout mask drawn and stored there)
            xa = _shrink(x, lora_A, 1.0 / (1.0 - p), **drop)
        y = F.linear(x, weight, bias)  # then y += s * xa @ B.T, accumulated by the same cuBLAS call
        return y.addmm_(xa.to(dt), lora_B.to(dt).t(), alpha=s), xa, bits


def _backward(dy, x, weight, lora_A, lora_B, xa, bits, s, p, needs, plan):
    """dy (M, N) -> dx (M, K), dA (r, K), dB (N, r); an empty tensor for each gradient not needed."""
    (M, K), dt = x.shape, dy.dtype
    plan, keep_scale = _plan_for(plan, M, lora_A.shape[0]), 1.0 / (1.0 - p)
    need_x, need_A, need_B = needs
    dx = dA = dB = none = dy.new_empty(0)
    with _device_guard(x):
        if plan == "composite":  # dyb = gs * g: the scale rides on the cuBLAS calls below (alpha)
            g, gs = dy.mm(lora_B.to(dt)), s
            if need_B:
                dB = torch.addmm(none.new_empty(()), dy.t(), xa, beta=0, alpha=s)
        else:  # one read of dy gives dyb (float32, scaled) and dB
            (g, dB), gs = _dy_pass(dy, lora_B, xa, s), 1.0
        if need_x and plan == "triton":
            drop = dict(bits=bits) if p > 0 else {}
            dx, _ = _matmul(dy, weight, lo=g, b_lr=lora_A, lo_scale=keep_scale, direction="bwd", **drop)
        elif need_x and p == 0:  # dx = dy @ W, then += gs * g @ A by the same cuBLAS call
            dx = dy.mm(weight).addmm_(g.to(dt), lora_A.to(dt), alpha=gs)
        elif need_x:  # dx0 = keep / (1 - p) * dyb @ A, then += dy @ W
            dx = g.to(dt).mm(lora_A.to(dt)).mul_(_unpack(bits, K)).mul_(gs * keep_scale).addmm_(dy, weight)
        if need_A and plan == "composite":
            h = x if p == 0 else x * _unpack(bits, K) * keep_scale
            dA = torch.addmm(none.new_empty(()), g.t(), h, beta=0, alpha=gs)
        elif need_A:  # (r, K) = dyb.T @ h: a reduction over the M tokens of x.T (K, M) and dyb.T (r, M)
            dA = _shrink(x.t(), g.t(), keep_scale, bits=bits if p > 0 else None, transpose_out=True)
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype)


class LoRALinearFunction(torch.autograd.Function):
    """Eager autograd for the op; saves x, W, A, B, xa and the dropout bits, nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, p, seed, plan, fuse):
        y, xa, bits = _forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, plan, fuse)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa, bits)
        ctx.scaling, ctx.p, ctx.plan = scaling, p, plan
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa, bits = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dA, dB = _backward(
            dy,
            x,
            weight,
            lora_A,
            lora_B,
            xa,
            bits,
            ctx.scaling,
            ctx.p,
            (needs[0], needs[3], needs[4]),
            ctx.plan,
        )
        return (
            (dx if needs[0] else None),
            None,
            None,
            (dA if needs[3] else None),
            (dB if needs[4] else None),
            *[None] * 5,
        )


@torch.library.custom_op("minilora::lora_fwd", mutates_args=())
def _lora_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor,
    scaling: float, p: float, seed: torch.Tensor | None, plan: str, fuse: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _forward(x, weight, bias, lora_A, lora_B, scaling, p, seed, plan, None if fuse < 0 else bool(fuse))


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, p, seed, plan, fuse):
    (M, K), r = x.shape, lora_A.shape[0]
    xa = x.dtype if _plan_for(plan, M, r) == "composite" else _acc_dtype(x)
    bits = x.new_empty(M, triton.cdiv(K, 8) if p > 0 else 0, dtype=torch.uint8)
    return x.new_empty(M, weight.shape[0]), x.new_empty(M, r, dtype=xa), bits


@torch.library.custom_op("minilora::lora_bwd", mutates_args=())
def _lora_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
    xa: torch.Tensor, bits: torch.Tensor, scaling: float, p: float, needs: list[bool], plan: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _backward(dy, x, weight, lora_A, lora_B, xa, bits, scaling, p, needs, plan)


@_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, bits, scaling, p, needs, plan):
    shapes = (x.shape, lora_A.shape, lora_B.shape)
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype)
    return tuple(
        x.new_empty(s if n else (0,), dtype=d) for s, n, d in zip(shapes, needs, dtypes, strict=True)
    )


def _setup_context(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, scaling, p, _, plan, _ = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], output[2])
    ctx.scaling, ctx.p, ctx.plan = scaling, p, plan


def _custom_op_backward(ctx, dy, _dxa, _dbits):
    x, weight, lora_A, lora_B, xa, bits = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 3, 4)]
    dx, dA, dB = _lora_bwd(dy, x, weight, lora_A, lora_B, xa, bits, ctx.scaling, ctx.p, needs, ctx.plan)
    return (
        (dx if needs[0] else None),
        None,
        None,
        (dA if needs[1] else None),
        (dB if needs[2] else None),
        *[None] * 5,
    )


_lora_fwd.register_autograd(_custom_op_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------
def lora_linear(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scaling,
    dropout_p=0.0,
    training=False,
    *,
    seed=None,
    plan="triton",
    fuse_shrink=None,
):
    """y = x @ weight.T + bias + scaling * dropout(x) @ lora_A.T @ lora_B.T with fused kernels.

    x: (..., in); weight: (out, in) and bias: (out,) or None, frozen, of x's dtype and device;
    lora_A: (r, in), lora_B: (out, r), of x's dtype or float32 (their gradients come back in their own
    dtype). Dropout is applied when training and dropout_p > 0, with one mask per call drawn from
    `seed` (an int or a one-element tensor; drawn from torch's generator on x's device when None).
    plan: "triton", "hybrid" or "composite" (module docstring, 5.). fuse_shrink: force (True) or forbid
    (False) the in-loop shrink of the "triton" plan; None decides by shape. Gradients flow to x, lora_A
    and lora_B only.
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        # What F.linear does under autocast: x and the frozen weights in the autocast dtype; the
        # adapters keep their own (the kernels cast tiles). The op itself runs with autocast off.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            return lora_linear(
                x,
                weight,
                bias,
                lora_A,
                lora_B,
                scaling,
                dropout_p,
                training,
                seed=seed,
                plan=plan,
                fuse_shrink=fuse_shrink,
            )
    _check_inputs(x, weight, bias, lora_A, lora_B, plan)
    p = float(dropout_p) if training else 0.0
    if p > 0 and not isinstance(seed, torch.Tensor):
        seed = (
            torch.randint(0, 2**31 - 1, (1,), device=x.device)
            if seed is None
            else torch.tensor([seed], device=x.device)
        )
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    args = (x2, weight, bias, lora_A, lora_B, float(scaling), p, seed if p > 0 else None, plan)
    if torch.compiler.is_compiling():
        y = _lora_fwd(*args, -1 if fuse_shrink is None else int(fuse_shrink))[0]
    else:
        y = LoRALinearFunction.apply(*args, fuse_shrink)
    return y.view(*x.shape[:-1], weight.shape[0])


def dropout_mask(seed, shape: tuple[int, int], p: float, device="cuda") -> torch.Tensor:
    """The keep-mask (M, K) (bool) that lora_linear draws for `seed` on an (M, K) input (leading dims of
    x flattened into M), from the same device function."""
    seed = seed if isinstance(seed, torch.Tensor) else torch.tensor([int(seed)], device=device)
    return _unpack(_draw_bits(seed, shape[0], shape[1], p), shape[1])


def _check_inputs(x, weight, bias, lora_A, lora_B, plan) -> None:
    """Shapes, dtypes and devices: what the kernels rely on. LoRA settings (r, alpha, dropout) are
    validated where they enter (minilora.config); this checks only what a direct caller can get wrong."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear: x has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    for name, t in dict(weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B).items():
        if t is None:
            continue
        if t.dtype != x.dtype and not (name.startswith("lora") and t.dtype == torch.float32):
            raise TypeError(
                f"lora_linear: {name} is {t.dtype} but x is {x.dtype}; cast it to x.dtype (adapters may be float32)"
            )
        if t.device != x.device:
            raise ValueError(f"lora_linear: {name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"lora_linear runs Triton kernels: it needs CUDA tensors, got {x.device}. On CPU, set "
            'TRITON_INTERPRET=1 before importing minilora.kernels (slow; for tests), or use minilora.set_backend("torch")'
        )
    n_out, n_in = weight.shape
    r = lora_A.shape[0]
    if x.shape[-1] != n_in or lora_A.shape != (r, n_in) or lora_B.shape != (n_out, r) or r < 1:
        raise ValueError(
            f"lora_linear: need x (..., in={n_in}), weight (out={n_out}, in), lora_A (r >= 1, in) and lora_B "
            f"(out, r); got x {tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if bias is not None and bias.shape != (n_out,):
        raise ValueError(f"lora_linear: bias must be (out={n_out},), got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError(
            "lora_linear keeps the base weight and bias frozen and returns no gradient for them; "
            "call weight.requires_grad_(False) (LoRALinear does)"
        )
    if plan not in PLANS:
        raise ValueError(f"lora_linear: plan must be one of {PLANS}, got {plan!r}")
