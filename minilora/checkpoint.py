"""Hugging Face Gemma checkpoint folders: config.json (both dialects) -> GemmaConfig, and the
safetensors weights read straight into the model (`minilora.gemma.from_pretrained`).

config.json comes in two dialects. transformers 4.x writes `rope_theta`, `rope_local_base_freq`,
`sliding_window_pattern` and `rope_scaling` (which Gemma 3 applies to full-attention layers only);
transformers 5.x writes `rope_parameters` (one dict, or one per layer type) and `layer_types`, which,
when present, decides which layers slide. Both read into the same GemmaConfig.

Loading builds the model on the meta device and reads each tensor from the file straight into its
final dtype and device, so the peak memory is the model plus one conversion buffer. It is strict:
missing, unexpected and mis-shaped tensors are errors that name them.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter

import torch
from torch import nn

from minilora import cpu
from minilora.gemma import Gemma, GemmaConfig
from minilora.inject import replace_module
from minilora.quant import QUANT_TYPES, Linear4bit

# What each model_type means: the architecture flags (not stored in config.json) and the defaults
# transformers' config classes fill in for absent keys (hub configs rely on them, e.g. the
# text_config of the multimodal Gemma 3 checkpoints lists only a handful of fields).
_ARCH = {
    "gemma": dict(sandwich_norms=False, qk_norm=False, slide_every=None),
    "gemma2": dict(sandwich_norms=True, qk_norm=False, slide_every=2),
    "gemma3_text": dict(sandwich_norms=True, qk_norm=True, slide_every=6),
}
_DEFAULTS = {
    "gemma": dict(
        vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=16, head_dim=256,
        rope_theta=10_000.0, sliding_window=None, attn_logit_softcapping=None,
        final_logit_softcapping=None,
    ),
    "gemma2": dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        rope_theta=10_000.0, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    ),
    "gemma3_text": dict(
        vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=None, final_logit_softcapping=None,
    ),
}  # fmt: skip
# The sizes config.json states under GemmaConfig's own names.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads")  # fmt: skip
# GELU spellings (transformers' ACT2FN names) -> F.gelu's `approximate`.
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}


def read_json(path: str | os.PathLike) -> dict:
    """The JSON object in a file (config.json, adapter_config.json, an index, a manifest); any other
    content (not UTF-8, not JSON, empty, a list, a key given twice) is a ValueError naming the file."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if not raw.strip():
            raise ValueError("the file is empty")
        obj = json_loads(raw.decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, bytes that are not UTF-8, a key twice, nesting
        raise ValueError(f"{os.fspath(path)} is not valid JSON ({e}); re-download or fix it") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{os.fspath(path)} holds a JSON {type(obj).__name__}, not an object; fix it")
    return obj


def json_loads(text: str, start: int | None = None):
    """json.loads, stricter: a key given twice in one object is an error (json keeps the last one),
    and deep nesting a ValueError (json raises RecursionError). With `start`: the value that begins
    there and the index after it (JSONDecoder.raw_decode)."""
    try:
        return _DECODER.decode(text) if start is None else _DECODER.raw_decode(text, start)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _unique_keys(pairs: list) -> dict:
    twice = [k for k, n in Counter(k for k, _ in pairs).items() if n > 1]
    if twice:
        raise ValueError(f"key {twice[0]!r} appears twice in one object")
    return dict(pairs)


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys)


def config_from_hf(hf: dict) -> GemmaConfig:
    """GemmaConfig from a Hugging Face config.json dict (transformers 4.x or 5.x dialect)."""
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # multimodal checkpoint: the language model's config is nested
        hf = dict(hf.get("text_config") or {})
        model_type = hf.setdefault("model_type", "gemma3_text")
    if model_type not in _ARCH:
        raise ValueError(
            f"model_type {model_type!r} is not a Gemma text model; minilora reads "
            f"{sorted([*_ARCH, 'gemma3'])}"
        )
    arch, c = _ARCH[model_type], {**_DEFAULTS[model_type], **hf}
    if c.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported")
    if c.get("attention_bias"):
        raise ValueError("attention_bias=True is not a Gemma layout; Gemma projections have no bias")
    _check_values(c)
    window = c.get("sliding_window")
    return GemmaConfig(
        **{k: c[k] for k in _SIZES},
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or c.get("head_dim") or 256),
        sandwich_norms=arch["sandwich_norms"],
        qk_norm=arch["qk_norm"],
        gelu_approximate=_gelu_approximate(model_type, hf),
        attn_logit_softcapping=c.get("attn_logit_softcapping"),
        final_logit_softcapping=c.get("final_logit_softcapping"),
        sliding_window=window,
        sliding_layers=_sliding_layers(c, arch["slide_every"]) if window is not None else (),
        **_rope(c, model_type),
    )


# What config.json's values must be where present: integers >= 1, or numbers > 0 (None is allowed
# for the optional ones: no window, no capping).
_AT_LEAST_ONE = (*_SIZES, "head_dim", "sliding_window")
_POSITIVE = ("rms_norm_eps", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
             "rope_theta", "rope_local_base_freq")  # fmt: skip


def _check_values(c: dict) -> None:
    for key in (*_AT_LEAST_ONE, *_POSITIVE):
        v = c.get(key)
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if key in _AT_LEAST_ONE and v is not None and not (number and v == int(v) and v >= 1):
            raise ValueError(f"config.json: {key} must be an integer >= 1, got {v!r}")
        if key in _POSITIVE and v is not None and not (number and v > 0):
            raise ValueError(f"config.json: {key} must be a number > 0, got {v!r}")


def _sliding_layers(c: dict, slide_every: int | None) -> tuple[bool, ...]:
    """Which layers slide: layer_types decides when present, else the generation's pattern (every
    `slide_every`-th layer, 1-based, is full attention; the others slide)."""
    n = c["num_hidden_layers"]
    if c.get("layer_types") is not None:
        types = list(c["layer_types"])
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types must list {n} of sliding_attention/full_attention, got {types}")
        return tuple(t == "sliding_attention" for t in types)
    every = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", slide_every))
    return tuple(bool(every) and (i + 1) % every != 0 for i in range(n))


def _rope(c: dict, model_type: str) -> dict:
    """The RoPE bases and linear scaling factors of full and sliding layers, from either dialect."""
    theta, local_theta = c.get("rope_theta", 10_000.0), c.get("rope_local_base_freq")
    rp = c.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        t, factor = _rope_dict(rp.get("full_attention"), "rope_parameters.full_attention")
        theta = t if t is not None else theta
        t, local_factor = _rope_dict(rp.get("sliding_attention"), "rope_parameters.sliding_attention")
        local_theta = t if t is not None else local_theta
    elif isinstance(rp, dict):
        t, factor = _rope_dict(rp, "rope_parameters")
        theta, local_factor = (t if t is not None else theta), factor
    else:
        _, factor = _rope_dict(c.get("rope_scaling"), "rope_scaling")
        local_factor = 1.0 if model_type == "gemma3_text" else factor
    return dict(
        rope_theta=float(theta),
        rope_local_base_freq=float(theta if local_theta is None else local_theta),
        rope_scaling_factor=factor,
        rope_local_scaling_factor=local_factor,
    )


def _rope_dict(params: dict | None, where: str) -> tuple[float | None, float]:
    """(theta or None, linear factor) from one rope_parameters / rope_scaling dict."""
    if not params:
        return None, 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(
            f"{where}: rope_type {kind!r} is not supported; minilora implements 'default' and 'linear'"
        )
    return params.get("rope_theta"), float(params["factor"]) if kind == "linear" else 1.0


def _gelu_approximate(model_type: str, hf: dict) -> str:
    """The MLP's GELU as transformers reads it: Gemma 1 from `hidden_act`, where the legacy "gelu"
    of the released configs means the tanh form (GemmaConfig rewrites it; the checkpoints were
    trained with it); Gemma 2/3 from `hidden_activation`, where "gelu" is the exact GELU."""
    if model_type == "gemma":
        act = hf.get("hidden_act") or "gelu_pytorch_tanh"
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in _GELU:
        raise ValueError(f"hidden activation {act!r} is not supported; Gemma uses GELU ({sorted(_GELU)})")
    return _GELU[act]


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """ "auto": bf16 on a CUDA GPU that supports it, float16 on one that does not (T4, V100: float16
    compute, gemma.py's docstring); on a CPU, bf16 where it has fast bf16 matrix instructions
    (minilora.cpu.fast_bf16: AMX or AVX-512-BF16, confirmed by a micro-benchmark), float32 elsewhere.
    float16 on a CPU is allowed, with a warning."""
    named = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16 if kind == "cpu" and cpu.fast_bf16()[0] else torch.float32
    elif not isinstance(dtype, torch.dtype):
        if dtype not in named:
            raise ValueError(f"dtype {dtype!r} is not one of 'auto', {sorted(named)} or a torch.dtype")
        dtype = named[dtype]
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        warnings.warn(
            "float16 on a CPU: CPUs have no fast float16 matmul (several times slower than float32); "
            "float16 is for GPUs without bfloat16 (T4, V100). Use float32 or bfloat16",
            stacklevel=1,  # one location: the warning shows once, however many callers resolve the dtype
        )
    return dtype


def from_pretrained(
    path: str | os.PathLike,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
) -> Gemma:
    """Build the Gemma model of a Hugging Face checkpoint folder (config.json + safetensors), each
    tensor read straight into `dtype` on `device` (see the module docstring). device="meta" builds
    from config.json alone. quantize="nf4" or "fp4": every linear weight becomes a 4-bit
    minilora.quant.Linear4bit as it is read (embedding, norms and the tied head stay in `dtype`,
    which is also the compute dtype). A folder that transformers + bitsandbytes saved in 4-bit
    (`quantization_config` in config.json) is read as it is, never quantized again. A `.gguf` file
    (llama.cpp's) keeps its quantized weights packed (minilora.gguf.load_model)."""
    path = os.fspath(path)
    if path.endswith(".gguf"):
        from minilora.gguf import load_model

        if quantize is not None:
            raise ValueError(
                f"{path} is already quantized (GGUF blocks, kept packed); drop quantize={quantize!r}, "
                "or convert it to a folder first (python -m minilora.gguf IN.gguf OUT_DIR)"
            )
        return load_model(path, dtype, device)
    if os.path.isfile(path):
        raise NotADirectoryError(
            f"{path!r} is a file; pass the checkpoint folder that holds config.json and the weights"
        )
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; is it a Hugging Face checkpoint folder?")
    hf = read_json(os.path.join(path, "config.json"))
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    quantize = _check_quantize(quantize, hf.get("quantization_config"), dtype, device)
    with torch.device("meta"):
        model = Gemma(config_from_hf(hf)).to(dtype)
    model.name_or_path = path
    if device.type != "meta":
        _load_weights(model, path, hf.get("model_type") == "gemma3", dtype, device, quantize)
    return model


def _check_quantize(quantize: str | None, stored: dict | None, dtype: torch.dtype, device) -> str | None:
    """The 4-bit type to quantize the linear weights to while reading them: `quantize`, or None when
    the folder holds bitsandbytes 4-bit weights already (`stored`: its quantization_config)."""
    if quantize not in (None, *QUANT_TYPES):
        raise ValueError(
            f"quantize={quantize!r} is not supported; use one of {', '.join(QUANT_TYPES)} or None"
        )
    if stored is not None:
        method, kind = stored.get("quant_method"), stored.get("bnb_4bit_quant_type", "nf4")
        problem = (
            f"quant_method {method!r}" if method != "bitsandbytes"
            else "8-bit weights (load_in_8bit, LLM.int8)" if stored.get("load_in_8bit")
            else f"bnb_4bit_quant_type {kind!r}" if kind not in QUANT_TYPES
            else f"{kind} weights, but quantize={quantize!r} asks for others" if quantize not in (None, kind)
            else None
        )  # fmt: skip
        if problem:
            raise ValueError(
                f"this checkpoint's quantization_config has {problem}; minilora reads the 4-bit "
                f"checkpoints of bitsandbytes ({', '.join(QUANT_TYPES)}) as they are (quantize=None), and "
                "quantizes float checkpoints itself (quantize='nf4')"
            )
    if (quantize or stored) and (
        dtype not in (torch.float32, torch.bfloat16, torch.float16)
        or (device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported())
    ):
        raise ValueError(
            f"4-bit weights are dequantized to the compute dtype: float32, bfloat16 or float16, as the "
            f"device supports it; got {dtype} on {device.type}. Pass dtype=torch.float32 (or "
            "torch.float16 on a GPU without bfloat16)"
        )
    return None if stored else quantize


# Multimodal Gemma 3 checkpoints hold the language model under another prefix, next to the vision
# tower, which a text model does not use.
_RENAMES = (("language_model.model.", "model."), ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."))  # fmt: skip
_SKIP = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def _load_weights(model: Gemma, path: str, multimodal: bool, dtype: torch.dtype, device, quantize) -> None:
    """Read every tensor of the checkpoint into `model` (built on meta), strictly. Linear weights are
    quantized as they arrive (`quantize`), or arrive in 4-bit: `<module>.weight` (packed) and the
    `<module>.weight.*` tensors of its quantization state (bitsandbytes' names)."""
    names: dict[str, tuple[str, str]] = {}  # our name -> (stored name, file)
    for stored, file in _weight_files(path).items():
        name = stored
        if multimodal:
            if stored.startswith(_SKIP):
                continue
            name = next((new + stored[len(old) :] for old, new in _RENAMES if stored.startswith(old)), stored)
        names[name] = (stored, file)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}
    expected["lm_head.weight"] = expected["model.embed_tokens.weight"]  # tied: checked, not loaded
    packed = {n.partition(".weight.")[0] for n in names if ".weight.quant_state." in n}
    packed &= {n.removesuffix(".weight") for n in expected}
    # a 4-bit weight's parts: None = read as stored; Linear4bit.from_state_dict checks them
    expected.update({n: None for n in names if n.partition(".weight")[0] in packed})
    missing = sorted(set(expected) - set(names) - {"lm_head.weight"})
    unexpected = sorted(set(names) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not fit the model its config.json describes:\n"
            f"  missing tensors ({len(missing)}): {missing[:20]}\n"
            f"  unexpected tensors ({len(unexpected)}): {unexpected[:20]}"
        )
    head, parts = None, {module: {} for module in packed}
    for name, tensor in _read_tensors(names, expected, dtype, device):
        module_name, _, leaf = name.rpartition(".")
        if expected[name] is None:
            parts[name.partition(".weight")[0]][name] = tensor
        elif name == "lm_head.weight":
            head = tensor
        elif quantize and leaf == "weight" and isinstance(model.get_submodule(module_name), nn.Linear):
            replace_module(model, module_name, Linear4bit.from_linear(tensor, quantize))
        else:
            setattr(model.get_submodule(module_name), leaf, nn.Parameter(tensor))
        del tensor  # one dense tensor in memory at a time
    for module_name, tensors in parts.items():
        shape = model.get_submodule(module_name).weight.shape
        layer = Linear4bit.from_state_dict(tensors, prefix=module_name + ".", shape=shape)
        replace_module(model, module_name, layer.to(dtype))  # the compute dtype; the codes stay
    if head is not None and not torch.equal(head, model.model.embed_tokens.weight):
        raise ValueError(
            f"{names['lm_head.weight'][0]} differs from model.embed_tokens.weight; minilora's Gemma "
            "ties the output head to the embedding and cannot load a separate head"
        )


def _check_finite(t: torch.Tensor, name: str, file: str) -> None:
    # A NaN or Inf anywhere makes the float32 sum NaN or infinite (trained weights are far too small
    # for the sum itself to overflow); no temporary of t's size.
    if not math.isfinite(t.sum(dtype=torch.float32)):
        raise ValueError(f"{file}: tensor {name} holds NaN or infinite values; re-download the checkpoint")


def _read_tensors(names: dict[str, tuple[str, str]], expected: dict, dtype: torch.dtype, device):
    """(name, tensor) for every name, file by file, in `dtype` (or as stored where the expected shape
    is None), each checked against its expected shape first."""
    by_file: dict[str, list[str]] = {}
    for name, (_, file) in names.items():
        by_file.setdefault(file, []).append(name)
    for file, group in by_file.items():
        header, data_start = _safetensors_header(file)
        with open(file, "rb", buffering=0) as f:
            for name in group:
                stored, shape = names[name][0], expected[name]
                if stored not in header:
                    raise ValueError(f"{file} does not contain {stored}, which the index maps to it")
                if shape is not None and tuple(header[stored]["shape"]) != shape:
                    raise ValueError(
                        f"{stored}: checkpoint shape {tuple(header[stored]['shape'])}, model expects {shape}"
                    )
                tensor = _read_tensor(
                    f, data_start, header[stored], stored, None if shape is None else dtype, device
                )
                if tensor.is_floating_point():
                    _check_finite(tensor, stored, file)
                yield name, tensor


def _weight_files(path: str) -> dict[str, str]:
    """name -> shard file, from model.safetensors.index.json or a single model.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        root = os.path.realpath(path)
        inside = lambda v: os.path.commonpath([root, os.path.realpath(os.path.join(root, v))]) == root
        outside = sorted({repr(v) for v in weight_map.values() if not (isinstance(v, str) and inside(v))})
        if outside:
            raise ValueError(f"{index} maps tensors to files outside the model folder: {outside[:3]}")
        files = {k: os.path.join(path, v) for k, v in weight_map.items()}
        missing = sorted({v for v in files.values() if not os.path.isfile(v)})
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    if os.path.isfile(single):
        return dict.fromkeys(_safetensors_header(single)[0], single)
    found = sorted(os.listdir(path))
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or model.safetensors.index.json "
        f"(found {found[:10]}); .bin/.pth/.gguf files are not read (minilora.gguf imports a GGUF file)"
    )


# safetensors' dtype names -> torch dtypes (the checkpoints use BF16, F16 or F32; 4-bit ones U8 too).
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "U8": torch.uint8}  # fmt: skip
_CHUNK_BYTES = 16 << 20  # conversion buffer when the stored dtype differs from the target


def _safetensors_header(path: str) -> tuple[dict, int]:
    """The tensors' table of a .safetensors file (name -> dtype, shape, data_offsets) and where the
    data starts. Format: 8-byte little-endian header length, JSON header, raw little-endian data.
    A file too short for the data its header promises is an error here, before anything is read."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little")
        if len(raw) < 8 or n <= 0 or n > 100_000_000:
            raise ValueError(f"{path} is not a safetensors file ({len(raw)} bytes, header length {n})")
        raw = f.read(n)
        if len(raw) < n:
            raise ValueError(f"{path} is truncated inside its header (re-download this file)")
        try:
            header = json_loads(raw.decode("utf-8"))
        except ValueError as e:
            raise ValueError(f"{path}: the safetensors header is corrupted ({e}); re-download it") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object; re-download it")
    header.pop("__metadata__", None)
    for name, e in header.items():
        ok = isinstance(e, dict) and isinstance(e.get("dtype"), str) and _naturals(e.get("shape"))
        if not (ok and _naturals(e.get("data_offsets")) and len(e["data_offsets"]) == 2 and
                e["data_offsets"][0] <= e["data_offsets"][1]):  # fmt: skip
            raise ValueError(
                f"{path}: the header entry of {name!r} is malformed (it needs dtype, shape and "
                "data_offsets [begin, end]); re-download the file"
            )
    size, data_start = os.path.getsize(path), 8 + n
    cut = [(e["data_offsets"], k) for k, e in header.items() if data_start + e["data_offsets"][1] > size]
    if cut:
        offsets, name = min(cut)  # the first tensor, in file order, whose data is not all there
        raise ValueError(
            f"{path} is truncated: tensor {name} ends at byte {data_start + offsets[1]} but the file "
            f"has {size} bytes (re-download this file)"
        )
    return header, data_start


def _naturals(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _read_tensor(
    f, data_start: int, entry: dict, name: str, dtype: torch.dtype | None, device
) -> torch.Tensor:
    """Read one tensor from an open safetensors file straight into a new (shape, dtype, device)
    tensor (dtype None: as stored). With plain reads (no mmap) only the result is resident: a mapped
    file's touched pages would count toward RSS and double the loading peak."""
    stored = _ST_DTYPES.get(entry["dtype"])
    if stored is None or (dtype is not None and not stored.is_floating_point):
        raise ValueError(f"{name}: stored dtype {entry['dtype']} is not a floating type minilora loads")
    dtype = dtype or stored
    shape, (begin, end) = entry["shape"], entry["data_offsets"]
    numel = math.prod(shape)
    if end - begin != numel * stored.itemsize:
        raise ValueError(f"{name}: {end - begin} bytes stored for shape {shape} of {entry['dtype']}")
    f.seek(data_start + begin)
    if stored == dtype and torch.device(device).type == "cpu":
        out = torch.empty(shape, dtype=dtype)
        _readinto(f, out.view(-1).view(torch.uint8), name)
        return out
    out = torch.empty(shape, dtype=dtype, device=device)
    flat, step = out.view(-1), max(1, _CHUNK_BYTES // stored.itemsize)
    buf = torch.empty(min(step, max(numel, 1)), dtype=stored)
    for i in range(0, numel, step):
        part = buf[: min(step, numel - i)]
        _readinto(f, part.view(torch.uint8), name)
        flat[i : i + part.numel()].copy_(part)
    return out


def _readinto(f, dst: torch.Tensor, name: str) -> None:
    view, done = memoryview(dst.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ValueError(f"{name}: {f.name} ends before the tensor's data does (truncated download?)")
        done += got
