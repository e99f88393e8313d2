"""4-bit base weights (QLoRA, Dettmers et al. 2023) and 8-bit blockwise codes, bit-compatible with
bitsandbytes (its CPU path, the tests' oracle).

4-bit: W (out, in), read as one flat vector in blocks of 64, is stored as one absmax per block and a
4-bit index per value into a 16-entry table, two per byte (first value in the high nibble):

    w ~ code[q] * absmax_block,    q = the code nearest to w / absmax_block

NF4's table holds quantiles of N(0, 1) scaled to [-1, 1], so normal weights use each code equally
often; FP4's is a float with a sign, 2 exponent bits and 1 mantissa bit, divided by 12. Double
quantization stores the absmax (0.5 bit per weight in float32) again as 8-bit codes, blocks of 256:

    absmax_block ~ dynamic[a] * nested_absmax_{block // 256} + offset,    offset = mean(absmax)

in bitsandbytes' dynamic code (Dettmers 2016: a decimal exponent and a fraction). 4.127 bits per weight.
Checkpoints (bitsandbytes, transformers) hold `weight` (packed uint8 (n/2, 1)), `weight.absmax`,
`weight.quant_map`, `weight.nested_absmax`, `weight.nested_quant_map` and
`weight.quant_state.bitsandbytes__nf4` (JSON as uint8: quant_type, blocksize, dtype, shape,
nested_blocksize, nested_dtype, nested_offset); Linear4bit's state dict has exactly these keys.

Linear4bit's forward dequantizes W to the compute dtype and multiplies, saving only the packed state
for backward; on CUDA a Triton kernel (kernels/dequant.py) fills a buffer that every layer reuses.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes reads
_CHUNK = 1 << 20  # values quantized at a time: whole blocks of every size, an even count
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)  # fmt: skip
# FP4 in bit-pattern order: a sign bit, 2 exponent bits (bias 2), 1 mantissa bit; 0b001 is subnormal
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")  # after `weight.`
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype")
_JSON_KEYS += ("nested_offset",)


# ----------------------------------------------------------------------------------------------------
# Code tables and 8-bit blockwise codes (the nested absmax; the 8-bit optimizer's moments)
# ----------------------------------------------------------------------------------------------------
@functools.cache
def code_4bit(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry table of `quant_type`, float32, indexed by the 4-bit code. Do not modify."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit quant type {quant_type!r}; supported: {', '.join(QUANT_TYPES)}")
    table = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, device=device)
    return table if quant_type == "nf4" else table / 12  # FP4 scaled to [-1, 1]


@functools.cache
def dynamic_map(signed: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic code, 256 sorted float32 values in [-1, 1] ([0, 1] unsigned): for
    e = 0..6, 10^(e-6) times the midpoints of 2^e (unsigned: 2^(e+1)) + 1 even steps on [0.1, 1],
    with both signs if signed; and 0 and 1. Few values for small magnitudes, many for large ones."""
    values = [0.0, 1.0]
    for e in range(7):
        grid = torch.linspace(0.1, 1, 2 ** (e if signed else e + 1) + 1)
        mids = 10.0 ** (e - 6) * ((grid[:-1] + grid[1:]) / 2)
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    return torch.tensor(sorted(values), device=device)


@functools.cache
def _lut_8bit(signed: bool, device: torch.device) -> torch.Tensor:
    """(65536,) uint8: for the grid point v_i = -1 + 2i / 65535, the code nearest to it (the number of
    midpoints between codes below v_i): bitsandbytes' CPU lookup table."""
    code = dynamic_map(signed, device)
    grid = -1.0 + (2.0 * torch.arange(65536, device=device, dtype=torch.float32)) / 65535.0
    return torch.searchsorted(0.5 * (code[:-1] + code[1:]), grid).to(torch.uint8)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x flattened to float32 and zero-padded to (ceil(n / blocksize), blocksize)."""
    x = x.reshape(-1).float()
    return F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)


def quantize_8bit(x: torch.Tensor, signed: bool = True, blocksize: int = 256):
    """x -> (uint8 codes shaped like x, float32 absmax per block) in the (un)signed dynamic code,
    bit-exact with bitsandbytes' CPU quantize_blockwise: v = x * (1 / absmax) is snapped to the grid
    i / 65535 of a lookup table, i = trunc((v + 1) / 2 * 65535 + 0.5), that holds the nearest code
    (so a v within 1/65535 of a midpoint may get the second nearest; bnb's CUDA kernel binary-searches
    instead). A block of zeros has absmax 0 and codes 0."""
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(1)
    v = (blocks * torch.where(absmax > 0, 1.0 / absmax, 0.0)[:, None]).clamp(-1, 1)
    q = _lut_8bit(signed, x.device)[((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)]
    q = torch.where(absmax[:, None] > 0, q, 0)
    return q.view(-1)[: x.numel()].view(x.shape), absmax


def dequantize_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256):
    """float32 code[q] * the absmax of q's block, shaped like q (also 4-bit codes, with 16 entries)."""
    values = _blocks(code[q.long()], blocksize) * absmax[:, None]
    return values.view(-1)[: q.numel()].view(q.shape)


# ----------------------------------------------------------------------------------------------------
# 4-bit quantization
# ----------------------------------------------------------------------------------------------------
def quantize_4bit(w: torch.Tensor, quant_type="nf4", *, blocksize=64, double_quant=True):
    """w (float32/bf16/fp16, any shape) -> (packed uint8 (ceil(n / 2), 1), QuantState), bit-exact with
    bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant, quant_type).
    Runs over chunks of 2^20 values, so its scratch memory stays ~30 MB whatever the weight's size."""
    code = code_4bit(quant_type, w.device)
    if w.dtype not in _DTYPES.values():
        raise TypeError(f"quantize_4bit takes float32, bfloat16 or float16 weights, got {w.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    flat = w.reshape(-1)
    chunks = [
        _quantize_4bit_chunk(flat[i : i + _CHUNK], code, blocksize) for i in range(0, w.numel(), _CHUNK)
    ]
    packed, absmax = (torch.cat(parts) for parts in zip(*chunks, strict=True))
    meta = dict(quant_type=quant_type, blocksize=blocksize, dtype=str(w.dtype)[6:], shape=list(w.shape))
    tensors = dict(absmax=absmax, quant_map=code.clone())
    if double_quant:
        offset = absmax.mean()
        tensors["absmax"], tensors["nested_absmax"] = quantize_8bit(absmax - offset, signed=True)
        tensors["nested_quant_map"] = dynamic_map(True, w.device).clone()
        meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=offset.item())
    return packed.unsqueeze(1), QuantState(meta, tensors)


def _quantize_4bit_chunk(x: torch.Tensor, code: torch.Tensor, blocksize: int):
    """x (flat; whole blocks but for the weight's last chunk) -> (packed uint8, float32 absmax)."""
    n, blocks = x.numel(), _blocks(x, blocksize)
    absmax = blocks.abs().amax(1)
    # bnb scales full blocks by x * (1 / absmax) and a last partial one by x / absmax (not always the
    # same float), and stores the absmax of a full block of zeros as 0, of a partial one as 1e-38
    safe = absmax.clamp(min=1e-38)
    scaled = blocks * (1.0 / safe)[:, None]
    if n % blocksize:
        scaled[-1], absmax[-1] = blocks[-1] / safe[-1], safe[-1]
    scaled = F.pad(scaled.clamp(-1, 1).view(-1)[:n], (0, n % 2))  # an odd count ends in a 0 nibble
    # nearest code = the number of midpoints between sorted codes below the value (ties go down);
    # FP4's +0 and -0 sort in table order: 0 -> +0 and (0, 0.0026] -> -0, as in bnb
    order = torch.argsort(code, stable=True)
    q = order[torch.bucketize(scaled, (code[order[:-1]] + code[order[1:]]) / 2)].to(torch.uint8)
    return q[0::2] << 4 | q[1::2], absmax


def dequantize_4bit(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None):
    """W in `dtype` (default: the dtype it was quantized from), in its shape: float32 code * absmax,
    rounded once; in float32 equal to bitsandbytes.functional.dequantize_4bit. Triton on CUDA."""
    return state.dequantize(packed, dtype)


class PackedState(nn.Module):
    """What turns a frozen packed weight back into W: the format's tensors as buffers and its fields
    in `meta`, at least `shape` (W's) and `dtype` (the dtype W dequantizes to by default). A module, so
    its buffers follow .to(device); never a dtype cast (their values are the format), but the default
    dtype follows model.to(dtype), as a bias would. Two formats share this one design (the frozen
    layer, linear_4bit, LoRA over it): QuantState, bitsandbytes' 4-bit, and minilora.ggml.BlockState,
    GGUF's block formats (llama.cpp), whose scales live inside the packed bytes."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.meta = meta
        for name, t in tensors.items():
            self.register_buffer(name, t)

    shape = property(lambda self: torch.Size(self.meta["shape"]))
    dtype = property(lambda self: _DTYPES[self.meta["dtype"]])

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
        """W (shape) in `dtype` (default: self.dtype), into `out` if given."""
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        for name, t in self._buffers.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        if dtype in _DTYPES.values():  # model.to(bfloat16): W dequantizes to bfloat16, as the bias is cast
            self.meta["dtype"] = str(dtype)[6:]
        return self


class QuantState(PackedState):
    """bitsandbytes' 4-bit state: its tensors as buffers (absmax: float32, or uint8 codes with
    nested_absmax / nested_quant_map when double-quantized; quant_map: the 16-entry table) and its
    JSON fields in `meta`."""

    quant_type = property(lambda self: self.meta["quant_type"])
    blocksize = property(lambda self: self.meta["blocksize"])
    nested = property(lambda self: "nested_offset" in self.meta)

    def extra_repr(self) -> str:
        return f"{self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested}"

    def absmax_float32(self) -> torch.Tensor:
        """Per-block absmax; double-quantized: dynamic[a] * nested_absmax + offset, rounded twice."""
        if not self.nested:
            return self.absmax
        absmax = dequantize_8bit(
            self.absmax, self.nested_absmax, self.nested_quant_map, self.meta["nested_blocksize"]
        )
        return absmax + self.meta["nested_offset"]

    def dequantize(self, packed: torch.Tensor, dtype: torch.dtype | None = None, out=None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if packed.is_cuda and dtype in _DTYPES.values():
            from minilora.kernels.dequant import dequantize_4bit_triton

            out = torch.empty(self.shape, dtype=dtype, device=packed.device) if out is None else out
            return dequantize_4bit_triton(packed, self, out)
        # each byte -> its two float32 codes in one gather from a 256-entry table (of int64: 8 bytes a
        # row); then each whole block times its absmax, in place; ~4x fewer passes than nibble by nibble
        n, bs, absmax = self.shape.numel(), self.blocksize, self.absmax_float32()
        pairs = torch.stack((self.quant_map.repeat_interleave(16), self.quant_map.repeat(16)), 1)  # (256, 2)
        w = pairs.view(torch.int64).view(-1).index_select(0, packed.view(-1).int()).view(torch.float32)[:n]
        full = n - n % bs
        w[:full].view(-1, bs).mul_(absmax[: full // bs, None])
        w[full:].mul_(absmax[full // bs :])  # a last partial block
        return w.view(self.shape).to(dtype)  # float64 (gradcheck): exact from float32

    def tensors(self) -> dict[str, torch.Tensor]:
        """bitsandbytes' saved tensors, keyed by their names after `weight.`."""
        text = torch.tensor(list(json.dumps(self.meta).encode()), dtype=torch.uint8)
        return {**self._buffers, f"quant_state.bitsandbytes__{self.quant_type}": text}

    @classmethod
    def from_tensors(cls, tensors: dict, where="weight", packed=None, shape=None) -> QuantState:
        """The inverse of tensors(), checked: the options minilora reads, every tensor the JSON implies
        (and the packed weight, if given) of the size it implies, and the weight's shape (if given:
        the layer's). Raises ValueError naming the key."""
        keys = [k for k in tensors if k.startswith("quant_state.bitsandbytes__")]
        if len(keys) != 1:
            raise ValueError(
                f"{where}: expected one quant_state.bitsandbytes__nf4 (or __fp4) entry, the JSON that "
                f"describes a 4-bit weight, found {keys or 'none'}; is this a bitsandbytes 4-bit checkpoint?"
            )
        meta = json.loads(bytes(tensors[keys[0]].tolist()))
        unknown, nested = sorted(set(meta) - set(_JSON_KEYS)), "nested_offset" in meta
        qtype, size, dtype, nested_dtype = (
            meta.get(k) for k in ("quant_type", "blocksize", "dtype", "nested_dtype")
        )
        problems = [message for bad, message in [
            (unknown, f"option(s) {unknown} that minilora does not support"),
            (qtype not in QUANT_TYPES, f"quant_type {qtype!r} (minilora reads {', '.join(QUANT_TYPES)})"),
            (size not in BLOCKSIZES, f"blocksize {size!r} (minilora reads {BLOCKSIZES})"),
            (dtype not in _DTYPES, f"dtype {dtype!r} (minilora reads {', '.join(_DTYPES)})"),
            (nested and nested_dtype != "float32", f"nested_dtype {nested_dtype!r} (minilora reads float32)"),
        ] if bad]  # fmt: skip
        if problems:
            raise ValueError(f"{where}: this 4-bit checkpoint has " + "; ".join(problems))
        n = math.prod(meta["shape"])
        blocks = math.ceil(n / size)
        expect = dict(
            absmax=(blocks, torch.uint8 if nested else torch.float32), quant_map=(16, torch.float32)
        )
        if nested:
            expect.update(nested_absmax=(math.ceil(blocks / meta["nested_blocksize"]), torch.float32),
                          nested_quant_map=(256, torch.float32))  # fmt: skip
        for name, (count, dtype) in expect.items():
            t = tensors.get(name)
            if t is None or t.numel() != count or t.dtype != dtype:
                got = "nothing" if t is None else f"{t.dtype} with {t.numel()}"
                raise ValueError(
                    f"{where}.{name}: expected {dtype} with {count} values for a {tuple(meta['shape'])} "
                    f"weight in blocks of {size}, got {got}; the tensors do not belong together"
                )
        if packed is not None and packed.numel() * packed.element_size() != (n + 1) // 2:  # any storage dtype
            raise ValueError(
                f"{where}: packed 4-bit weight has {packed.numel() * packed.element_size()} bytes but a "
                f"{tuple(meta['shape'])} weight takes {(n + 1) // 2} (two codes per byte); the tensors do "
                "not belong together"
            )
        if shape is not None and tuple(meta["shape"]) != tuple(shape):
            raise ValueError(
                f"{where}: the checkpoint's 4-bit weight is {tuple(meta['shape'])} but this layer is "
                f"{tuple(shape)}; load it into a layer of that shape"
            )
        return cls(meta, {name: tensors[name].reshape(-1) for name in expect})

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # held as `quant_state` by the module of the weight: write bnb's `<module>.weight.*` keys
        for name, t in self.tensors().items():
            destination[f"{prefix.removesuffix('quant_state.')}weight.{name}"] = (
                t if keep_vars else t.detach()
            )

    def _load_from_state_dict(self, *args, **kwargs):
        pass  # read by load_quant_state, the pre-hook of the module that holds the weight


def load_quant_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    """Load-state-dict pre-hook of a module holding a packed `weight` and its `quant_state` (Linear4bit,
    LoRALinear over one): reads bnb's `weight.*` keys into the QuantState after checking them."""
    if not isinstance(module.quant_state, QuantState):
        return  # GGUF's block formats: the scales are inside `weight`, which loads as it is
    where = prefix + "weight"
    tensors = {k[len(where) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(where + ".")}
    known = (*_TENSOR_KEYS, "quant_state.bitsandbytes__")
    unexpected += [f"{where}.{k}" for k in tensors if not k.startswith(known)]
    if not tensors:
        missing.append(f"{where}.quant_state.bitsandbytes__{module.quant_state.quant_type}")
        return
    packed = state_dict.get(where)
    try:
        state = QuantState.from_tensors(tensors, where, packed, (module.out_features, module.in_features))
    except ValueError as e:
        errors.append(str(e))
        return
    if packed is not None and packed.dtype != torch.uint8:  # bnb_4bit_quant_storage: the same bytes
        state_dict[where] = packed.reshape(-1).view(torch.uint8).view(-1, 1)
    # as load_state_dict(assign=...) does: the checkpoint's tensors, or copies on the module's device
    assign, target = local_metadata.get("assign_to_params_buffers", False), module.quant_state
    device, target.meta = target.absmax.device, state.meta
    target._buffers.clear()
    for name, t in state._buffers.items():
        target.register_buffer(name, t if assign else t.to(device, copy=True))


# ----------------------------------------------------------------------------------------------------
# The frozen 4-bit linear layer
# ----------------------------------------------------------------------------------------------------
_scratch: dict[tuple, torch.Tensor] = {}
KEEP_BYTES = 1 << 30  # keep_dequantized's default budget


class _Kept:
    """keep_dequantized's weights: {(data_ptr, shape, device, dtype): (packed view, W)}, and the
    bytes of budget left. The packed view holds its storage, so its data_ptr is not reused."""

    def __init__(self, budget: int):
        self.weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.left = budget

    def get(self, packed: torch.Tensor, state: PackedState, dtype: torch.dtype) -> torch.Tensor:
        key = (packed.data_ptr(), packed.shape, packed.device, dtype)
        if key not in self.weights:
            w = state.dequantize(packed, dtype)
            size = w.numel() * w.element_size()
            if size > self.left:
                return w
            self.weights[key], self.left = (packed, w), self.left - size
        return self.weights[key][1]


_kept: contextvars.ContextVar[_Kept | None] = contextvars.ContextVar("minilora_kept", default=None)


@contextlib.contextmanager
def keep_dequantized(max_bytes: int | None = None):
    """Within the block, each packed weight is dequantized once and its W kept for the next call,
    up to max_bytes (default KEEP_BYTES) of W in all; weights past the budget are dequantized per
    call, as outside. For decoding, which reads every weight once per token: the real 270M decodes
    3.3x faster from its Q4_K_M file (RESULTS.md). Frozen weights only: nothing checks whether they
    change inside the block. Per thread (a context variable); a nested block shares the outer one."""
    outer = _kept.get()
    token = _kept.set(outer or _Kept(KEEP_BYTES if max_bytes is None else max_bytes))
    try:
        yield
    finally:
        _kept.reset(token)


def _dense(packed: torch.Tensor, state: PackedState, dtype: torch.dtype) -> torch.Tensor:
    """W for one GEMM. Inside keep_dequantized, the kept W while the budget lasts. On CUDA in a flat
    buffer that every layer reuses (per device, stream, dtype): the next layer's dequantization
    overwrites it only after this GEMM, queued on the same stream."""
    if (kept := _kept.get()) is not None:
        return kept.get(packed, state, dtype)
    if not packed.is_cuda or dtype not in _DTYPES.values():
        return state.dequantize(packed, dtype)
    key, n = (packed.device, torch.cuda.current_stream(packed.device).cuda_stream, dtype), state.shape.numel()
    if key not in _scratch or _scratch[key].numel() < n:
        _scratch[key] = torch.empty(n, dtype=dtype, device=packed.device)
    return state.dequantize(packed, dtype, out=_scratch[key][:n].view(state.shape))


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ W.T + b, W dequantized from its packed state (a PackedState) and frozen (no gradient).
    Saves the packed weight (and holds the small state), never a dense W: backward dequantizes again,
    dx = dy @ W."""

    @staticmethod
    def forward(ctx, x, packed, bias, state):
        ctx.state, ctx.has_bias = state, bias is not None
        ctx.save_for_backward(packed)
        return F.linear(x, _dense(packed, state, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        (packed,) = ctx.saved_tensors
        dx = dy @ _dense(packed, ctx.state, dy.dtype) if ctx.needs_input_grad[0] else None
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db, None


def linear_4bit(x: torch.Tensor, packed: torch.Tensor, state: PackedState, bias: torch.Tensor | None = None):
    """x @ W.T + bias in x's dtype (in the autocast dtype under autocast), W from (packed, state)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return linear_4bit(x.to(torch.get_autocast_dtype(x.device.type)), packed, state, bias)
    return Linear4bitFunction.apply(x, packed, None if bias is None else bias.to(x.dtype), state)


class Linear4bit(nn.Linear):
    """A frozen nn.Linear whose weight is packed: `weight` is the uint8 Parameter (no gradient),
    `quant_state` its PackedState: a QuantState (4-bit) or a GGUF BlockState (minilora.ggml). With a
    QuantState the state dict has bitsandbytes' keys (`weight`, `weight.absmax`, ..., `bias`):
    state_dict() exports a bnb checkpoint's tensors, load_state_dict() reads them. An nn.Linear, so
    that inject(), "all-linear" and load_adapter() take it as one."""

    def __init__(self, packed: torch.Tensor, quant_state: PackedState, bias: torch.Tensor | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: no dense weight is ever allocated
        self.out_features, self.in_features = quant_state.shape
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias, requires_grad=False))
        self.quant_state = quant_state
        self.register_load_state_dict_pre_hook(load_quant_state)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear | torch.Tensor, quant_type="nf4", *, blocksize=64, double_quant=True
    ):
        """Quantize an nn.Linear (or a weight (out, in)); its bias is kept as it is."""
        w, b = (linear, None) if isinstance(linear, torch.Tensor) else (linear.weight, linear.bias)
        packed, state = quantize_4bit(w.detach(), quant_type, blocksize=blocksize, double_quant=double_quant)
        return cls(packed, state, None if b is None else b.detach().clone())

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "", shape=None) -> Linear4bit:
        """A layer from bitsandbytes' saved tensors `{prefix}weight`, `{prefix}weight.absmax`, ...,
        `{prefix}bias` (if any): e.g. one module's keys in a transformers 4-bit checkpoint. `shape`:
        the (out, in) the weight must have."""
        own = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        if "weight" not in own:
            raise ValueError(f"{prefix}weight: no packed 4-bit weight among the tensors")
        quant = {k.removeprefix("weight."): v for k, v in own.items() if k.startswith("weight.")}
        state = QuantState.from_tensors(quant, prefix + "weight", own["weight"], shape)
        return cls(own["weight"].reshape(-1).view(torch.uint8).view(-1, 1), state, own.get("bias"))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W (out, in) in `dtype` (default: the dtype it was quantized from)."""
        return self.quant_state.dequantize(self.weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight, self.quant_state, self.bias)


def quantize_model(model: nn.Module, quant_type: str = "nf4", *, skip=(), blocksize=64, double_quant=True):
    """Replace every nn.Linear of `model` by a Linear4bit, except the output head (a head tied to the
    embedding stays in the compute dtype, with it) and the modules named in `skip` (exact names or
    dotted suffixes). Returns the replaced names. Quantize before inject()."""
    from minilora.inject import lora_layers, name_matches, output_head_names, replace_module

    if any(True for _ in lora_layers(model)):
        raise ValueError(
            "quantize_model: the model already has LoRA layers; quantize the base before inject()"
        )
    code_4bit(quant_type)  # checks the name
    heads = output_head_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, Linear4bit)
             and n not in heads and not any(name_matches(n, s) for s in skip)]  # fmt: skip
    for name in names:
        layer = Linear4bit.from_linear(model.get_submodule(name), quant_type, blocksize=blocksize,
                                       double_quant=double_quant)  # fmt: skip
        replace_module(model, name, layer)
    return names
