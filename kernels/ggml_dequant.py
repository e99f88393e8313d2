"""
GGUF block dequantization (llama.cpp's Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K)
==========================================================================

The op, for value j of a block b (minilora/ggml.py has the formats; d, dmin: float16 in the block):

    Q8_0  w = q * d                   q = int8 b[2 + j]
    Q4_0  w = d * (q - 8)             q = nibble j // 16 of b[2 + j % 16]
    Q5_0  w = d * (q - 16)            as Q4_0 from b[6 + j % 16], 5th bit: bit j of the 32-bit qh
    Q4_K  w = (d * sc_s) * q - dmin * m_s        s = j // 32, sc/m: 6 bits of the 12 scale bytes
    Q5_K  as Q4_K, 5th bit: bit s of qh[j % 32]
    Q6_K  w = (d * sc_t) * (q - 32)   t = j // 16, q: 4 bits of ql, 2 bits of qh, sc: int8

Design: dequantize into a buffer, then a cuBLAS GEMM (quant.py's `_dense`), as for the 4-bit format
(kernels/dequant.py has the case for that split). One program per BLOCKS blocks (1024 values); each
value gathers its own quant and scale bytes, which repeat within a block and hit L1, so DRAM sees
each packed byte once and each output once: memory-bound, 0.56-1.06 bytes read + 2 written per
value (bf16).

Bit-exact with the PyTorch reference: the same float32 operations in the same order (each product
and difference rounded once; the launch disables FMA contraction), integers and float16 scales
converted exactly, and one cast to out's dtype, rounding to nearest even (on a GPU; tests/conftest.py
makes Triton's CPU interpreter round bfloat16 the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from minilora.ggml import BLOCK_TYPES, values_shape

from .dequant import OUT_DTYPES
from .lora_linear import _device_guard

VALUES_PER_PROGRAM = 1024  # BLOCKS = 32 blocks of 32 values or 4 of 256


@triton.jit
def _byte(p):
    return tl.load(p).to(tl.int32)


@triton.jit
def _int8(p):
    return tl.load(p).to(tl.int8, bitcast=True).to(tl.float32)


@triton.jit
def _f16(p):
    """The little-endian float16 at byte pointer p, as float32 (exact)."""
    bits = tl.load(p).to(tl.uint16) | (tl.load(p + 1).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4_0(b, j, QH: tl.constexpr):
    """Q4_0, or Q5_0 with QH: b (BLOCKS, 1) block pointers, j (1, 32) -> (BLOCKS, 32) float32."""
    q = (_byte(b + 2 + 4 * QH + j % 16) >> (j // 16 * 4)) & 15
    if QH:
        q |= ((_byte(b + 2 + j // 8) >> (j % 8)) & 1) << 4
    return _f16(b) * (q - 8 - 8 * QH).to(tl.float32)


@triton.jit
def _q4_k(b, j, QH: tl.constexpr):
    """Q4_K, or Q5_K with QH (its qh[32] sits before the nibbles): j (1, 256)."""
    s = j // 32  # the sub-block; sc, m: 6 bits of bytes 4 + s, 8 + s (s < 4), else the nibbles of byte
    lo, hi, md = _byte(b + 4 + s % 4), _byte(b + 8 + s % 4), _byte(b + 12 + s % 4)  # 8 + s and 2 bits of both
    sc = tl.where(s < 4, lo & 63, (md & 15) | ((lo >> 2) & 48))
    m = tl.where(s < 4, hi & 63, (md >> 4) | ((hi >> 2) & 48))
    q = (_byte(b + 16 + 32 * QH + s // 2 * 32 + j % 32) >> (s % 2 * 4)) & 15
    if QH:
        q |= ((_byte(b + 16 + j % 32) >> s) & 1) << 4
    d, dm = _f16(b) * sc.to(tl.float32), _f16(b + 2) * m.to(tl.float32)
    return d * q.to(tl.float32) - dm


@triton.jit
def _q6_k(b, j):
    """Q6_K: j (1, 256); each half of 128 values reads 64 bytes of ql and 32 of qh."""
    h, i = j // 128, j % 128
    low = (_byte(b + h * 64 + i % 64) >> (i // 64 * 4)) & 15
    high = (_byte(b + 128 + h * 32 + i % 32) >> (i // 32 * 2)) & 3
    d = _f16(b + 208) * _int8(b + 192 + j // 16)
    return d * ((low | (high << 4)) - 32).to(tl.float32)


@triton.jit
def _dequant_blocks_kernel(
    # Pointers
    packed_ptr,  # uint8 (n_blocks * BYTES,)
    out_ptr,  # (n_blocks * VALUES,) float32, bfloat16 or float16
    # Size
    n_blocks,
    # Meta-parameters
    TYPE: tl.constexpr,  # the format's name in minilora.ggml.BLOCK_TYPES
    BYTES: tl.constexpr,
    VALUES: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)[:, None]  # (BLOCKS, 1)
    b = packed_ptr + tl.minimum(block, n_blocks - 1) * BYTES  # past the end: the last block, not stored
    j = tl.arange(0, VALUES)[None, :]  # (1, VALUES)
    if TYPE == "Q8_0":
        w = _int8(b + 2 + j) * _f16(b)
    elif TYPE == "Q4_0":
        w = _q4_0(b, j, 0)
    elif TYPE == "Q5_0":
        w = _q4_0(b, j, 1)
    elif TYPE == "Q4_K":
        w = _q4_k(b, j, 0)
    elif TYPE == "Q5_K":
        w = _q4_k(b, j, 1)
    else:
        w = _q6_k(b, j)
    tl.store(out_ptr + block * VALUES + j, w.to(out_ptr.dtype.element_ty), mask=block < n_blocks)


def dequantize_ggml_triton(packed: torch.Tensor, ggml_type: int, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` (..., values per row; float32, bfloat16 or float16, contiguous) with the rows of a
    GGUF tensor of `ggml_type` (a key of minilora.ggml.BLOCK_TYPES), `packed` (..., bytes per row)
    uint8; returns out. Equal to minilora.ggml.dequantize(packed, ggml_type, out.dtype)."""
    if ggml_type not in BLOCK_TYPES:
        raise ValueError(f"ggml_type {ggml_type} is not a block format; use one of {sorted(BLOCK_TYPES)}")
    name, values, size = BLOCK_TYPES[ggml_type]
    if (
        packed.dtype != torch.uint8
        or not packed.is_contiguous()
        or packed.ndim == 0
        or packed.shape[-1] % size
    ):
        raise ValueError(
            f"packed must be contiguous uint8 rows of whole {name} blocks ({size} bytes each), "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    shape = values_shape(packed.shape, ggml_type)
    if out.shape != shape or not out.is_contiguous() or out.dtype not in OUT_DTYPES:
        raise ValueError(
            f"out must be a contiguous float32/bfloat16/float16 tensor of shape {shape} for these {name} "
            f"rows, got {out.dtype} {tuple(out.shape)}"
        )
    n_blocks, blocks = packed.numel() // size, VALUES_PER_PROGRAM // values
    if n_blocks:
        with _device_guard(packed):  # Triton launches on the current device, not the tensor's
            _dequant_blocks_kernel[(triton.cdiv(n_blocks, blocks),)](
                packed,
                out,
                n_blocks,
                TYPE=name,
                BYTES=size,
                VALUES=values,
                BLOCKS=blocks,
                enable_fp_fusion=False,
            )
    return out
