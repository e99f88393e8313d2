"""Putting LoRALinear into any nn.Module by name, and the model-level operations on it.

Matching follows peft's rules: a target name matches a module whose dotted name equals it or ends
in "." + name; one string is a regex that must fullmatch the dotted name; "all-linear" is every
nn.Linear but the output head. Unlike peft, every entry of a target list must match something:
a typo is an error that suggests the real names, never a silently smaller adapter.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from minilora.config import LoRAConfig
from minilora.lora import LoRALinear


def layer_index(name: str) -> int | None:
    """peft's layer index (layers_to_transform with no layers_pattern): the first number that is a
    whole dotted segment after two or more others. "model.layers.3.mlp.up_proj" -> 3,
    "encoder.block.1.layer.0.wi" -> 1, "layers.3.fc" -> None."""
    m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _matches_any(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, e) for e in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: `lm_head`, the module get_output_embeddings() returns, or a
    Linear whose weight is an nn.Embedding's weight (tied)."""
    heads = {n for n, _ in model.named_modules() if n == "lm_head" or n.endswith(".lm_head")}
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for n, m in model.named_modules():
        if m is out or (isinstance(m, nn.Linear) and id(m.weight) in embedding_weights):
            heads.add(n)
    return heads


def _suggest(entry: str, names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    close = difflib.get_close_matches(entry.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)
    close = close or difflib.get_close_matches(entry, names, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return "Linear modules in this model end in: " + ", ".join(leaves[:12])


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The dotted names of the modules `config` selects, in model order. Raises ValueError on a
    target that selects nothing, a match that is not an nn.Linear, or a module already wrapped."""
    modules = dict(model.named_modules())
    linear = [n for n, m in modules.items() if isinstance(m, (nn.Linear, LoRALinear))]
    if config.targets == "all-linear":
        heads = output_head_names(model)
        matches = {"targets='all-linear'": [n for n in linear if n not in heads]}
    else:  # each list entry matches by name; a regex string is one entry, fullmatched
        specs = (
            {e: [e] for e in config.targets}
            if isinstance(config.targets, list)
            else {f"target regex {config.targets!r} (it must fullmatch a dotted name)": config.targets}
        )
        matches = {e: [n for n in modules if n and _matches_any(n, spec)] for e, spec in specs.items()}
    problems, selected = [], set()
    for entry, matched in matches.items():
        kept = [n for n in matched if _allowed(n, config)]
        selected.update(kept)
        if not matched:
            hint = (
                _suggest(entry, linear)
                if isinstance(config.targets, list)
                else f"names look like {linear[:3]}"
            )
            problems.append(f"{entry} matches nothing; {hint}")
        elif not kept:
            no_layer = config.layers is not None and layer_index(matched[0]) is None
            problems.append(
                f"{entry} matches {len(matched)} module(s), but exclude={config.exclude!r} / "
                f"layers={config.layers!r} remove all of them"
                + (f" ({matched[0]} is in no layer by peft's rule; use a regex target)" if no_layer else "")
            )
    if problems:
        raise ValueError("LoRA targets that would adapt nothing:\n  " + "\n  ".join(problems))
    selected = [n for n in modules if n in selected]
    wrapped = [n for n in selected if isinstance(modules[n], LoRALinear)]
    if wrapped:
        raise ValueError(
            f"already has LoRA (inject twice?): {', '.join(wrapped[:5])}. To replace their adapter "
            "weights use minilora.load_adapter(model, dir); to adapt other modules, leave these out of "
            "targets"
        )
    not_linear = [
        f"{n} ({type(modules[n]).__name__})" for n in selected if not isinstance(modules[n], nn.Linear)
    ]
    if not_linear:
        raise ValueError(
            f"LoRA targets must be nn.Linear modules; these are not: {', '.join(not_linear[:5])}. "
            "Name the projections inside them instead."
        )
    check_unshared(model, selected)
    return selected


def _allowed(name: str, config: LoRAConfig) -> bool:
    if config.exclude is not None and _matches_any(name, config.exclude):
        return False
    return config.layers is None or layer_index(name) in config.layers


def check_unshared(model: nn.Module, names: list[str]) -> None:
    """Refuse LoRA on a Linear whose weight another module also uses (a head tied to the embedding):
    merging would write W + dW into the other module's weight too."""
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(n)
    for n in names:
        others = [o for o in owners[id(model.get_submodule(n).weight)] if o != n]
        if others:
            raise ValueError(
                f"{n} shares its weight with {', '.join(others)} (tied embeddings); LoRA on it would "
                "change that module too when merged. Drop it from the targets or untie the weights first"
            )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> None:
    """requires_grad only on LoRA parameters."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("lora_A") or n.endswith("lora_B"))


def inject(
    model: nn.Module, config: LoRAConfig, *, adapter_dtype: torch.dtype | None = torch.float32
) -> list[str]:
    """Wrap the modules `config` selects in LoRALinear, freeze everything else, return their names."""
    names = find_targets(model, config)  # collect first, then replace
    for name in names:
        r, alpha = config.rank_and_alpha(name)
        layer = LoRALinear(
            model.get_submodule(name),
            r=r,
            alpha=alpha,
            dropout=config.dropout,
            use_rslora=config.use_rslora,
            init=config.init,
            adapter_dtype=adapter_dtype,
        )
        replace_module(model, name, layer)
    freeze_base(model)
    return names


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied parameter counts once, a packed weight (4-bit,
    GGUF) as the values it holds, not its bytes."""
    params = list(model.parameters())  # parameters() lists a tied parameter once
    packed = {id(m.weight): m.quant_state.shape.numel() for m in model.modules()
              if getattr(m, "quant_state", None) is not None}  # fmt: skip
    total = sum(packed.get(id(p), p.numel()) for p in params)
    return sum(p.numel() for p in params if p.requires_grad), total


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base weight (idempotent). Forward then costs nothing extra."""
    for n, m in lora_layers(model):
        try:
            m.merge()
        except ValueError as e:
            raise ValueError(f"{n}: {e}") from None


def unmerge(model: nn.Module) -> None:
    """Restore every base weight bit for bit (idempotent)."""
    for _, m in lora_layers(model):
        m.unmerge()


@contextmanager
def disabled(model: nn.Module):
    """Inside the block the model computes the base model's output (merged adapters are taken
    out for the duration and put back after)."""
    layers = [m for _, m in lora_layers(model)]
    state = [(m, m.disabled, m.merged) for m in layers]
    try:
        for m in layers:
            m.unmerge()
            m.disabled = True
        yield model
    finally:
        for m, was_disabled, was_merged in state:
            m.disabled = was_disabled
            if was_merged:
                m.merge()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict (its own key names) with every adapter folded into its weight
    (LoRALinear.merged_weight) and no LoRA keys: ready for safetensors.save_file. A tensor shared
    under two names (an output head tied to the embedding) is kept once, under its first name, as
    Hugging Face checkpoints have `model.embed_tokens.weight` and no `lm_head.weight`."""
    out, seen = {}, set()
    layers = dict(lora_layers(model))
    # 4-bit weights (minilora.quant) leave as dense W in the dtype they were quantized from
    quantized = {n: m for n, m in model.named_modules() if getattr(m, "quant_state", None) is not None}
    for key, value in model.state_dict(keep_vars=True).items():
        module_name, _, leaf = key.rpartition(".")
        layer = layers.get(module_name)
        if id(value) in seen or (layer is not None and leaf in ("lora_A", "lora_B")):
            continue
        owner, state_key, _ = ("." + key).rpartition(".weight.")
        if state_key and owner[1:] in quantized:  # the quantization state (weight.absmax, ...)
            continue
        seen.add(id(value))
        if layer is not None and leaf == "weight" and not layer.merged:
            try:
                value = layer.merged_weight()
            except ValueError as e:
                raise ValueError(f"{module_name}: {e}") from None
        elif module_name in quantized and leaf == "weight":
            value = quantized[module_name].dequantize()
        out[key] = value.detach().contiguous()
    return out
