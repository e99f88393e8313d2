"""minilora -> llama.cpp: a LoRA adapter as llama.cpp's adapter GGUF, and a merged model as a GGUF.

    export_adapter("runs/x/adapter", "adapter.gguf", base="model.gguf")
    export_merged("model.gguf", "runs/x/adapter", "merged.gguf", ggml_type="q8_0")
    python -m minilora.gguf export-adapter runs/x/adapter adapter.gguf --base model.gguf
    python -m minilora.gguf export-merged --base model.gguf --adapter runs/x/adapter out.gguf --type f16

llama.cpp's LoRA file (what its convert_lora_to_gguf.py writes, what `llama-cli --lora` and
`Llama(lora_path=...)` read): general.architecture = the base's, general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha (float32), and for each adapted weight N of the base file
(`blk.0.attn_q.weight`) the tensors `N.lora_a` (numpy shape (r, in)) and `N.lora_b` ((out, r)).
llama.cpp adds alpha / r * B @ (A @ x) with r read from lora_a: one alpha for every module, so an
adapter whose modules differ in alpha / r (alpha_pattern, rank_pattern with one alpha, rsLoRA's
alpha / sqrt(r)) has each lora_b scaled by its own scaling / (alpha / r) instead.

The merged file copies the base file's metadata (tokenizer included) and its 1-D tensors (norms) as
they are; every matrix becomes --type: W0 dequantized, plus scaling * B @ A where adapted
(LoRALinear.merged_weight, float32), quantized by the `gguf` package (llama.cpp's own).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from minilora.adapter import CONFIG_NAME, module_alpha, read_adapter
from minilora.atomic import write_files
from minilora.config import check
from minilora.gguf import _LAYER_NAMES, GGUFFile, _hf_name, _import_gguf, _nbytes, gguf_file, load_model

MERGED_TYPES = {"f16": 1, "bf16": 30, "q8_0": 8}  # --type -> GGML type
_FILE_TYPES = {1: 1, 30: 32, 8: 7}  # GGML type -> general.file_type (llama.cpp's LLAMA_FTYPE_MOSTLY_*)


def gguf_tensor_name(module: str) -> str:
    """A Gemma linear layer's module name -> its weight's name in llama.cpp's files:
    model.layers.3.self_attn.q_proj -> blk.3.attn_q.weight."""
    inverse = {hf: g for g, hf in _LAYER_NAMES.items()}
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in inverse:
        return f"blk.{parts[2]}.{inverse[parts[3]]}.weight"
    raise ValueError(f"{module} is not a Gemma layer's projection; llama.cpp has no tensor for it")


def export_adapter(
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    base: str | os.PathLike | GGUFFile | None = None,
) -> Path:
    """Write the peft-format adapter in `adapter_dir` as llama.cpp's LoRA GGUF at `out_path` (see the
    module docstring). `base`, the GGUF file it adapts, gives the architecture (default "gemma3") and
    is checked to hold every adapted weight, of the adapter's shape."""
    config, modules = read_adapter(adapter_dir)
    alpha, rslora = config.get("lora_alpha", 8), bool(config.get("use_rslora", False))
    check("alpha", alpha, f"{Path(adapter_dir) / CONFIG_NAME}: lora_alpha")
    tensors = []
    for module, pair in modules.items():
        A, B = pair["lora_A"].float(), pair["lora_B"].float()  # (r, in), (out, r)
        r = A.shape[0]
        scaling = module_alpha(config, module, adapter_dir) / (math.sqrt(r) if rslora else r)
        if scaling != alpha / r:  # llama.cpp applies alpha / r: fold the difference into B
            B = B * (scaling / (alpha / r))
        name = gguf_tensor_name(module)
        tensors += [(f"{name}.lora_a", A.numpy()), (f"{name}.lora_b", B.numpy())]  # float32
    arch = "gemma3" if base is None else _check_base(gguf_file(base), tensors)
    # key -> (value, GGUF value type: 8 string, 6 float32; item type of an array)
    meta = {"general.type": ("adapter", 8, None), "adapter.type": ("lora", 8, None)}
    meta["adapter.lora.alpha"] = (alpha, 6, None)
    entries = [(name, a.shape, 0, lambda a=a: a) for name, a in tensors]
    out = Path(out_path)
    write_files({out: lambda p: _write_gguf(p, arch, meta, entries)})
    return out


def _check_base(base: GGUFFile, tensors) -> str:
    """The base file's architecture, after checking that it has every adapted weight W (out, in)."""
    shapes = {t.name: t.shape for t in base.tensors}
    for (a_name, A), (_, B) in zip(tensors[::2], tensors[1::2], strict=True):
        name = a_name.removesuffix(".lora_a")
        if shapes.get(name) != (B.shape[0], A.shape[1]):
            have = "no such tensor" if name not in shapes else f"shape {shapes[name]}"
            raise ValueError(
                f"{base.path} has {have} for {name}, which the adapter changes as ({B.shape[0]}, "
                f"{A.shape[1]}); export against the base the adapter was trained on"
            )
    return base.meta["general.architecture"]


def export_merged(
    base: str | os.PathLike | GGUFFile,
    adapter_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    ggml_type="f16",
) -> Path:
    """Write base + adapter as one GGUF file that llama.cpp runs without the adapter (see the module
    docstring); ggml_type: "f16", "bf16" or "q8_0", the type of every matrix."""
    from minilora.adapter import load_adapter

    if ggml_type not in MERGED_TYPES:
        raise ValueError(
            f"--type {ggml_type!r}: the merged model is written as one of {sorted(MERGED_TYPES)}"
        )
    kind = MERGED_TYPES[ggml_type]
    reader = gguf_file(base)
    model = load_model(reader, torch.float32)
    load_adapter(model, adapter_dir)
    meta = {k: (v, *reader.types[k]) for k, v in reader.meta.items() if k not in _SET_BY_WRITER}
    meta["general.file_type"] = (_FILE_TYPES[kind], 4, None)
    tensors = []
    for t in reader.tensors:
        if len(t.shape) == 1:  # norms: as they are (Gemma's 1 + w, float32)
            tensors.append((t.name, t.shape, t.ggml_type, lambda t=t: reader.numpy(t)))
        else:
            module = model.get_submodule(_hf_name(t.name)[0].removesuffix(".weight"))
            tensors.append((t.name, t.shape, kind, lambda m=module: _quantize(_dense(m), kind)))
    out = Path(out_path)
    write_files({out: lambda p: _write_gguf(p, reader.meta["general.architecture"], meta, tensors)})
    return out


_SET_BY_WRITER = ("general.architecture", "general.alignment")  # GGUFWriter writes its own


@torch.no_grad()
def _dense(module) -> torch.Tensor:
    """A module's W (out, in) in float32: merged with its adapter (LoRALinear), else dequantized."""
    if hasattr(module, "merged_weight"):
        return module.merged_weight()
    return module.dequantize(torch.float32) if hasattr(module, "quant_state") else module.weight.float()


def _quantize(w: torch.Tensor, kind: int) -> np.ndarray:
    gguf = _import_gguf()
    return gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(kind))


def _write_gguf(path: Path, arch: str, meta: dict, tensors: list) -> None:
    """A GGUF file by llama.cpp's own writer, one tensor in memory at a time. meta: key -> (value,
    value type, item type); tensors: (name, shape, GGML type, a function that gives its data)."""
    gguf = _import_gguf()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, (value, kind, item) in meta.items():
        writer.add_key_value(key, value, gguf.GGUFValueType(kind), item and gguf.GGUFValueType(item))
    for name, shape, kind, _ in tensors:  # numpy's shape; the writer lists it fastest-first
        kind = gguf.GGMLQuantizationType(kind)
        writer.add_tensor_info(name, shape, np.float32, _nbytes(kind, shape), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, _, _, data in tensors:
        writer.write_tensor_data(np.ascontiguousarray(data()))
    writer.close()
