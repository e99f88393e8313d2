"""GGUF's block formats (llama.cpp's ggml), kept packed and dequantized on the fly in PyTorch.

A GGUF weight W (out, in) is stored row by row, each row a whole number of blocks; a block holds
`values` consecutive values of a row in `size` bytes, its scales included (d, dmin: float16):

    type  values bytes  value                          layout of one block
    Q8_0    32    34    d * q                          d, q: int8[32]
    Q4_0    32    18    d * (q - 8)                    d, nibbles[16]: byte j = value j (low), j + 16 (high)
    Q5_0    32    22    d * (q - 16)                   d, qh[4]: bit i = 5th bit of value i, nibbles[16]
    Q4_K   256   144    d * sc_s * q - dmin * m_s      d, dmin, 6-bit sc/m of 8 sub-blocks s in 12 bytes,
                                                       nibbles[128]: 32 bytes = sub-blocks 2g (low), 2g + 1
    Q5_K   256   176    d * sc_s * q - dmin * m_s      as Q4_K, with qh[32]: bit s of qh[j] = 5th bit of
                                                       value j of sub-block s
    Q6_K   256   210    d * sc_t * (q - 32)            ql[128] 4 low bits, qh[64] 2 high bits, int8 sc of 16
                                                       sub-blocks t, d (last)

Each product and difference is one float32 operation in the order written, as in ggml's
dequantize_row_* and the `gguf` package's numpy code: bit-exact with gguf.quants.dequantize. One
cast to the compute dtype comes last. The bit operations run on uint8 tensors, on any device; on
CUDA, BlockState runs the same operations in a Triton kernel (kernels/ggml_dequant.py). A BlockState
plugs these formats into minilora.quant's frozen layer (Linear4bit, linear_4bit, LoRA over it);
`Embedding` is the tied embedding and output head.
"""

from __future__ import annotations

import torch
from torch import nn

from minilora.quant import _DTYPES, PackedState, linear_4bit

# GGML type number -> (name, values per block, bytes per block): the packed formats minilora reads.
BLOCK_TYPES = {8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18), 6: ("Q5_0", 32, 22), 12: ("Q4_K", 256, 144),
               13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}  # fmt: skip
# GGML type number -> (name, dtype) of the unpacked formats: read as dense tensors.
DENSE_TYPES = {0: ("F32", torch.float32), 1: ("F16", torch.float16), 30: ("BF16", torch.bfloat16)}
HEAD_VALUES = 1 << 20  # values of W per chunk of the tied head: 4 MB of float32, which stay in cache


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) uint8 -> (n, k) float32: little-endian float16s."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """b (..., m) uint8, m % 4 == 0 -> (..., len(shifts), m): (b >> s) & mask for each shift s, four
    bytes at a time in int32 (the mask keeps each byte's bits apart). Scalar shifts on contiguous
    data: PyTorch's CPU kernels are several times slower on strided or broadcast operands."""
    x = b.contiguous().view(torch.int32)
    return torch.stack([(x >> s) & (mask * 0x01010101) for s in shifts], -2).view(torch.uint8)


def _spread_bits(words: torch.Tensor) -> torch.Tensor:
    """(n, 1) int32 -> (n, 32) uint8: bit i of each word. Four bits t at a time: t * 0x204081 moves
    bit k of t to bit 8k (no two terms overlap), i.e. into byte k (little-endian)."""
    return torch.cat([(((words >> s) & 15) * 0x204081) & 0x01010101 for s in range(0, 32, 4)], 1).view(
        torch.uint8
    )


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of Q4_K / Q5_K -> (sc, m), each (n, 8) float32: 6-bit values, sub-blocks 0-3 in
    the low 6 bits of bytes 0-3 (sc) and 4-7 (m), sub-blocks 4-7 in the nibbles of bytes 8-11 plus
    the top 2 bits of bytes 0-7."""
    d, m, md = scales.view(-1, 3, 4).unbind(1)  # (n, 4) each
    sc = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), 1)
    mn = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), 1)
    return sc.float(), mn.float()


# The legacy types in place on one float32 tensor (a third fewer passes over it than out of place):
# q - 8 is exact in float32, and d * q rounds once either way.
def _q8_0(b):
    return b[:, 2:].view(torch.int8).float().mul_(_f16(b[:, :2]))


def _q4_0(b):
    q = _bits(b[:, 2:], (0, 4), 15).flatten(1)  # (n, 32) in 0..15
    return q.float().sub_(8.0).mul_(_f16(b[:, :2]))


def _q5_0(b):
    high = _spread_bits(b[:, 2:6].contiguous().view(torch.int32))  # bit i of the 32-bit qh
    q = _bits(b[:, 6:], (0, 4), 15).flatten(1) | (high << 4)  # (n, 32) in 0..31
    return q.float().sub_(16.0).mul_(_f16(b[:, :2]))


def _q4_k(b, high=None):
    n = b.shape[0]
    sc, m = _scale_min_k4(b[:, 4:16])
    d, dm = (_f16(b[:, 0:2]) * sc)[..., None], (_f16(b[:, 2:4]) * m)[..., None]  # (n, 8, 1)
    q = _bits(b[:, -128:].reshape(n, 4, 32), (0, 4), 15).reshape(n, 8, 32)
    q = q if high is None else q | (high << 4)
    return (d * q.float() - dm).view(n, 256)


def _q5_k(b):
    return _q4_k(b, high=_bits(b[:, 16:48], range(8), 1))  # (n, 8, 32): bit s of qh[j]


def _q6_k(b):
    n = b.shape[0]
    low = _bits(b[:, :128].reshape(n, 2, 64), (0, 4), 15).reshape(n, 8, 32)
    high = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().view(n, 16, 16)
    d = (_f16(b[:, 208:210]) * b[:, 192:208].view(torch.int8).float())[..., None]  # (n, 16, 1)
    return (d * q).view(n, 256)


_DEQUANTIZE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q5_0": _q5_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def values_shape(packed_shape, ggml_type: int) -> tuple[int, ...]:
    """(..., bytes per row) of packed rows of a block type -> (..., values per row)."""
    _, values, size = BLOCK_TYPES[ggml_type]
    return (*packed_shape[:-1], packed_shape[-1] // size * values)


def dequantize(packed: torch.Tensor, ggml_type: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows of a GGUF tensor: packed (..., bytes per row) uint8 -> (..., values per row) in dtype."""
    if ggml_type in DENSE_TYPES:
        return packed.view(DENSE_TYPES[ggml_type][1]).to(dtype)
    name, _, size = BLOCK_TYPES[ggml_type]
    w = _DEQUANTIZE[name](packed.reshape(-1, size))  # (blocks, values) float32
    return w.view(values_shape(packed.shape, ggml_type)).to(dtype)


class BlockState(PackedState):
    """A weight (out, in) in one of BLOCK_TYPES, packed as (out, bytes per row) uint8. No buffers:
    the scales are in the packed bytes. Any number of leading rows dequantize (a lookup, a chunk)."""

    def __init__(self, ggml_type: int, shape, dtype: torch.dtype = torch.float32):
        super().__init__(dict(ggml_type=ggml_type, shape=list(shape), dtype=str(dtype)[6:]), {})

    def extra_repr(self) -> str:
        return BLOCK_TYPES[self.meta["ggml_type"]][0]

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
        dtype, ggml_type = dtype or self.dtype, self.meta["ggml_type"]
        if packed.is_cuda and dtype in _DTYPES.values():  # the dtypes the kernel writes, as QuantState
            from minilora.kernels.ggml_dequant import dequantize_ggml_triton

            shape = values_shape(packed.shape, ggml_type)
            out = torch.empty(shape, dtype=dtype, device=packed.device) if out is None else out
            return dequantize_ggml_triton(packed.contiguous(), ggml_type, out)
        w = dequantize(packed, ggml_type, dtype)
        return w if out is None else out.copy_(w)

    def rows(self, n: int) -> BlockState:
        """The state of n of W's rows (a chunk of the output head)."""
        return BlockState(self.meta["ggml_type"], (n, self.shape[1]), self.dtype)


class Embedding(nn.Module):
    """A frozen token embedding kept in its GGUF block format, which is also the tied output head:
    `weight` packed (vocab, bytes per row) uint8, `quant_state` its BlockState. Rows are dequantized
    per lookup; the head per chunk of vocabulary rows (HEAD_VALUES values; linear_4bit: each chunk
    saves its packed rows for backward, never a dense W). Chunks of 42 MB (16k rows) made a decoding
    step of the 270M 4x slower than chunks of 1k rows (page faults, cache misses)."""

    def __init__(self, packed: torch.Tensor, quant_state: BlockState):
        super().__init__()
        self.num_embeddings, self.embedding_dim = quant_state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = quant_state

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quant_state.dequantize(self.weight[ids])  # (..., d)

    def dequantize(self, dtype: torch.dtype | None = None, start: int = 0, stop: int | None = None):
        """Rows start:stop of W (all by default) in `dtype` (default: the model's)."""
        return self.quant_state.dequantize(self.weight[start:stop], dtype)

    def _chunk_starts(self) -> tuple[range, int]:
        """(the first row of each chunk of about HEAD_VALUES values, rows per chunk)."""
        rows = max(1, HEAD_VALUES // self.embedding_dim)
        return range(0, self.num_embeddings, rows), rows

    def chunks(self, dtype: torch.dtype):
        """(first row, those rows of W in dtype), chunk by chunk: the fused loss's head."""
        starts, rows = self._chunk_starts()
        for start in starts:
            yield start, self.dequantize(dtype, start, start + rows)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) @ W.T -> (..., vocab) in h's dtype, W dequantized chunk by chunk."""
        starts, rows = self._chunk_starts()
        chunks = [self.weight[i : i + rows] for i in starts]
        return torch.cat([linear_4bit(h, c, self.quant_state.rows(c.shape[0])) for c in chunks], -1)
