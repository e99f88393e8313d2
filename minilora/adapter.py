"""Adapter files in peft's on-disk format, both directions.

adapter_config.json holds peft's LoraConfig fields; adapter_model.safetensors holds, per wrapped
module `name`, `base_model.model.{name}.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).

Two traps in peft's loader shape what we write: it drops tensors of modules its config's
`target_modules` does not select, and ignores keys without the `base_model.model.` prefix. So the
written config selects exactly the modules in the file, and every key carries the prefix.
On load the weights file is the truth: rank from the tensor shapes, targets from the keys.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from minilora.atomic import previous, write_folder
from minilora.checkpoint import read_json
from minilora.config import check, match_pattern_key
from minilora.inject import (
    check_unshared,
    freeze_base,
    layer_index,
    lora_layers,
    name_matches,
    replace_module,
)
from minilora.lora import LoRALinear

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_NAME = "minilora_prompt.json"  # minilora's own: the prompt format of training (peft ignores it)
PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.(?P<which>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def _peft_config(
    model: nn.Module, layers: dict[str, LoRALinear], base_model_name_or_path: str | None
) -> dict:
    names = list(layers)
    ranks = Counter(m.r for m in layers.values())
    alphas = Counter(m.alpha for m in layers.values())
    r, alpha = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    rank_pattern = {re.escape(n): m.r for n, m in layers.items() if m.r != r}
    alpha_pattern = {re.escape(n): m.alpha for n, m in layers.items() if m.alpha != alpha}
    rslora = {m.use_rslora for m in layers.values()}
    if len(rslora) > 1:
        raise ValueError("peft's format has one use_rslora flag; these adapters mix rslora and plain scaling")
    # The short form peft itself writes (leaf names, then also layer indices) where peft selects
    # exactly these modules with it; else one regex that fullmatches exactly their names.
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    indices = sorted({layer_index(n) for n in names} - {None})
    inside_lora = tuple(n + "." for n in names)
    base_names = [n for n, _ in model.named_modules() if n and not n.startswith(inside_lora)]

    def peft_selects(name: str, layers_to_transform: list[int] | None) -> bool:
        # peft's check_target_module_exists for a list of target_modules and no layers_pattern.
        if name in leaves:
            return True
        if not any(name_matches(name, t) for t in leaves):
            return False
        return layers_to_transform is None or layer_index(name) in layers_to_transform

    for layers_to_transform in (None, indices):
        if {n for n in base_names if peft_selects(n, layers_to_transform)} == set(names):
            target_modules = leaves
            break
    else:
        target_modules, layers_to_transform = "(" + "|".join(re.escape(n) for n in names) + ")", None
    dropouts = {m.dropout_p for m in layers.values()}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "target_modules": target_modules,
        "exclude_modules": None,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }


def adapter_files(model: nn.Module, *, base_model_name_or_path: str | None = None, prompt=None):
    """The files of the model's adapter, as {name: write} for minilora.atomic: adapter_config.json and
    adapter_model.safetensors (peft's format), and PROMPT_NAME (None without a prompt)."""
    layers = dict(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRA layers to save; call minilora.inject(model, config) first")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None)
    config = json.dumps(_peft_config(model, layers, base_model_name_or_path), indent=2, sort_keys=True)
    tensors = {f"{PREFIX}{name}.{which}.weight": getattr(m, which).detach().contiguous().cpu()
               for name, m in layers.items() for which in ("lora_A", "lora_B")}  # fmt: skip
    from safetensors.torch import save_file  # here, so that `import minilora.kernels` needs no safetensors

    text = lambda obj: lambda p: p.write_text(obj + "\n", encoding="utf-8")
    return {
        WEIGHTS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
        CONFIG_NAME: text(config),
        PROMPT_NAME: None if prompt is None else text(json.dumps(prompt, indent=2)),
    }


def save_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    prompt: dict | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (peft's format) into `out_dir`, and with
    `prompt` ({"format", "template"} of minilora.data, the prompt format it was trained with) the
    small PROMPT_NAME file, which peft ignores and minilora-generate applies. The folder is replaced
    as a whole (minilora.atomic.write_folder): a crash or a failed save leaves the old adapter or the
    new one, never a folder that loads as neither; the folder's other files are kept."""
    out = Path(out_dir)
    write_folder(out, adapter_files(model, base_model_name_or_path=base_model_name_or_path, prompt=prompt))
    return out


def read_prompt(adapter_dir: str | os.PathLike) -> dict | None:
    """The prompt format an adapter was trained with (save_adapter's `prompt`), or None."""
    path = Path(adapter_dir) / PROMPT_NAME
    return read_json(path) if path.is_file() else None


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config dict, {module name: {"lora_A": (r, in), "lora_B": (out, r)}}) from an adapter folder."""
    d = Path(adapter_dir)
    if not d.is_dir() and previous(d).is_dir():  # a crash inside save_adapter's swap: the old one, whole
        d = previous(d)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    config_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not an adapter folder (peft or minilora)")
    if not weights_path.is_file():
        bin_file = (d / "adapter_model.bin").exists()
        hint = " (found adapter_model.bin: convert it to safetensors)" if bin_file else ""
        raise FileNotFoundError(f"{weights_path} is missing{hint}")
    config = read_json(config_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{config_path}: DoRA adapters (use_dora=true) are not supported yet")
    if config.get("fan_in_fan_out"):
        raise ValueError(f"{config_path}: fan_in_fan_out=true (GPT-2 Conv1D layers) is not supported")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"could not read {weights_path} (truncated or corrupted?): {e}") from None
    return config, _modules(tensors, weights_path)


def _modules(tensors: dict[str, torch.Tensor], weights_path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The weights file's tensors by module, {name: {"lora_A", "lora_B"}}, each checked: a LoRA key,
    floating point, given once, both of a pair, matrices of one rank."""
    if not tensors:
        raise ValueError(f"{weights_path} holds no tensors: not an adapter (re-save or re-download it)")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}  # (module, lora_A/lora_B) -> the first key that holds it
    for key, value in tensors.items():
        m = _KEY.match(key.removeprefix(PREFIX))
        if m is None:
            raise ValueError(
                f"{weights_path}: key {key!r} is not a LoRA linear weight (lora_A/lora_B); embedding LoRA, "
                "DoRA magnitudes and modules_to_save are not supported yet"
            )
        if not value.is_floating_point():
            raise ValueError(f"{weights_path}: {key} is {value.dtype}; LoRA weights are floating point")
        first = keys.setdefault((m["module"], m["which"]), key)
        if first != key:
            raise ValueError(f"{weights_path}: {first} and {key} are the same weight; keep one of them")
        modules.setdefault(m["module"], {})[m["which"]] = value
    for name, pair in modules.items():
        if len(pair) != 2:
            raise ValueError(f"{weights_path}: {name} has {sorted(pair)} but needs both lora_A and lora_B")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.ndim != 2 or B.ndim != 2 or 0 in A.shape or A.shape[0] != B.shape[1]:
            raise ValueError(
                f"{weights_path}: {name}.lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} must be "
                "non-empty matrices (r, in) and (out, r) of one rank r"
            )
    return modules


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    adapter_dtype: torch.dtype | None = torch.float32,
    trainable: bool = False,
) -> list[str]:
    """Load an adapter written by minilora or peft into `model`; returns the adapted module names.
    Modules not yet wrapped are wrapped (rank from the weights, alpha, dropout and rslora from the
    config); wrapped ones get their weights and scaling replaced. A model that already has LoRA on a
    module the file does not cover is an error (the result would be neither adapter). Everything is
    checked before the model is touched. With trainable=False the whole model is frozen."""
    config, modules = read_adapter(adapter_dir)
    where = f"{Path(adapter_dir) / CONFIG_NAME}: "
    use_rslora, dropout = config.get("use_rslora", False), config.get("lora_dropout", 0.0)
    check("use_rslora", use_rslora, where + "use_rslora")
    check("dropout", dropout, where + "lora_dropout")
    alphas = _check_fit(model, adapter_dir, config, modules)
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unused = [t for t in targets if not any(name_matches(n, t) for n in modules)]
        if unused:
            log.warning(
                "adapter config lists target_modules with no weights in the file (ignored): %s", unused
            )
    with torch.no_grad():
        for name, alpha in alphas.items():
            module = model.get_submodule(name)
            if not isinstance(module, LoRALinear):
                r = modules[name]["lora_A"].shape[0]
                module = LoRALinear(module, r=r, alpha=alpha, dropout=dropout, adapter_dtype=adapter_dtype)
                replace_module(model, name, module)
            was_merged = module.merged
            module.unmerge()
            module.set_scaling(alpha, use_rslora)
            module.lora_A.copy_(modules[name]["lora_A"])
            module.lora_B.copy_(modules[name]["lora_B"])
            if was_merged:
                module.merge()
    if trainable:
        freeze_base(model)
    else:
        model.requires_grad_(False)
    return list(modules)


def module_alpha(config: dict, name: str, adapter_dir) -> float:
    """The alpha of module `name` in an adapter config: its alpha_pattern entry, else lora_alpha, else
    peft's LoraConfig default (8), so both libraries read the same scaling. Checked."""
    pattern = config.get("alpha_pattern") or {}
    k = match_pattern_key(pattern, name)
    field, alpha = (
        (f"alpha_pattern[{k!r}]", pattern[k])
        if k is not None
        else ("lora_alpha", config.get("lora_alpha", 8))
    )
    check("alpha", alpha, f"{Path(adapter_dir) / CONFIG_NAME}: {field} (the alpha of {name})")
    return float(alpha)


def _check_fit(model: nn.Module, adapter_dir, config: dict, modules: dict) -> dict[str, float]:
    """Check the adapter against `model` (modules present, nn.Linear, not tied, no other LoRA in the
    model, shapes, finite values) and return each module's alpha: all before the model is touched."""
    weights_path = Path(adapter_dir) / WEIGHTS_NAME
    present = dict(model.named_modules())
    missing = [n for n in modules if n not in present]
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(
            f"adapter in {adapter_dir} has weights for module(s) this model does not have: "
            f"{', '.join(missing[:5])}{more}"
        )
    uncovered = [n for n, _ in lora_layers(model) if n not in modules]
    if uncovered:
        raise ValueError(
            f"the model already has LoRA on {', '.join(uncovered[:5])}, which {weights_path} has no "
            "weights for; loading would mix two adapters. Load into a model without LoRA, or one with "
            "LoRA on exactly the file's modules"
        )
    alphas = {}
    for name, pair in modules.items():
        module = present[name]
        if not isinstance(module, (nn.Linear, LoRALinear)):
            raise ValueError(f"adapter targets {name}, which is a {type(module).__name__}, not an nn.Linear")
        r = pair["lora_A"].shape[0]
        expect = {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
        if isinstance(module, LoRALinear):
            expect = {"lora_A": tuple(module.lora_A.shape), "lora_B": tuple(module.lora_B.shape)}
        for which, tensor in pair.items():
            key = f"{weights_path}: {PREFIX}{name}.{which}.weight"
            if tuple(tensor.shape) != expect[which]:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)} but the model needs {expect[which]}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{key} has NaN/Inf values")
        alphas[name] = module_alpha(config, name, adapter_dir)
    try:
        check_unshared(model, list(modules))
    except ValueError as e:
        raise ValueError(f"{weights_path}: {e}") from None
    return alphas
