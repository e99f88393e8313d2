"""
4-bit dequantization (NF4 / FP4, bitsandbytes' layout)
======================================================

The op, for weight index i of a flat W with n values (minilora/quant.py has the format):

    q      = packed[i // 2] >> 4 if i is even else packed[i // 2] & 15     first value in the high nibble
    absmax = dynamic[a[b]] * nested_absmax[b // NESTED_BLOCKSIZE] + offset  b = i // BLOCKSIZE (double-quant)
             (or absmax[b], float32, without double quantization)
    W[i]   = code[q] * absmax                                                float32, rounded once to out's dtype

code (16 entries) and dynamic (256) are tables passed as tensors, so any checkpoint's tables work.

Design: dequantize into a buffer, then a cuBLAS GEMM (F.linear); the buffer is shared by every layer
of the same dtype on a device (quant.py). In training M is thousands of tokens: the GEMM's 2 M K N
flops dominate, while this pass is memory-bound, 0.5 byte read + 2 bytes written per weight (bf16),
~50 us for a 4096 x 14336 projection on a 3 TB/s GPU against ~0.5 ms for its GEMM at M = 4096.
Fusing the dequantization into a Triton GEMM would save that write and re-read but give up cuBLAS'
speed on the GEMM itself (and its backward, dy @ W, is a second GEMM that would need its own fused
kernel); for single-token decoding (M = 1) a fused GEMV would win, which is not the training case.

Blocked algorithm: one program per BLOCK consecutive outputs. The packed bytes and the outputs stream
through once; the per-block absmax loads repeat within a block and the table gathers hit a 16- and a
256-entry table, all in L1.

Bit-exact with the PyTorch reference: the launch disables FMA contraction (the absmax line is a
multiply then an add, each rounded once, as in PyTorch), and the one cast to out's dtype rounds to
nearest even (on a GPU; tests/conftest.py makes Triton's CPU interpreter round bfloat16 the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_linear import _device_guard

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _dequant_4bit_kernel(
    # Pointers
    packed_ptr,  # uint8, (n + 1) // 2: two 4-bit codes per byte
    absmax_ptr,  # uint8 codes (NESTED) or float32, one per BLOCKSIZE weights
    code_ptr,  # float32 (16,): the 4-bit table
    nested_absmax_ptr,  # float32, one per NESTED_BLOCKSIZE absmax codes (NESTED only)
    nested_code_ptr,  # float32 (256,): the 8-bit dynamic table (NESTED only)
    out_ptr,  # (n,) float32, bfloat16 or float16
    # Size and scalar
    n,
    offset,  # float32: the mean of the absmax (NESTED only)
    # Meta-parameters
    BLOCKSIZE: tl.constexpr,
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0)
    q = tl.where(offs % 2 == 0, byte >> 4, byte & 15).to(tl.int32)
    value = tl.load(code_ptr + q, mask=mask, other=0.0)
    block = offs // BLOCKSIZE
    if NESTED:
        a = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        absmax = tl.load(nested_code_ptr + a, mask=mask, other=0.0) * scale + offset
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (value * absmax).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_4bit_triton(packed: torch.Tensor, state, out: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Fill `out` (W's shape; float32, bfloat16 or float16, contiguous) with W dequantized from
    `packed` (uint8) and `state` (a minilora.quant.QuantState); returns out."""
    n = state.shape.numel()
    if out.numel() != n or not out.is_contiguous() or out.dtype not in OUT_DTYPES:
        raise ValueError(f"out must be a contiguous float32/bfloat16/float16 tensor of {n} values")
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed must be uint8 with {(n + 1) // 2} bytes for a {tuple(state.shape)} weight")
    nested, absmax, meta = state.nested, state.absmax, state.meta
    with _device_guard(packed):  # Triton launches on the current device, not the tensor's
        _dequant_4bit_kernel[(triton.cdiv(n, block),)](
            packed, absmax, state.quant_map,
            state.nested_absmax if nested else absmax, state.nested_quant_map if nested else state.quant_map,
            out, n, meta.get("nested_offset", 0.0),
            BLOCKSIZE=state.blocksize, NESTED_BLOCKSIZE=meta.get("nested_blocksize", 1),
            NESTED=nested, BLOCK=block,
            enable_fp_fusion=False,
        )  # fmt: skip
    return out
