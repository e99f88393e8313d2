"""LoRAConfig: what to adapt and how (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Field names follow loralib/peft where they exist (`r`, `alpha` = peft's `lora_alpha`,
`rank_pattern`, `alpha_pattern`), so a peft `adapter_config.json` maps onto this one to one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

INITS = ("kaiming", "gaussian")


@dataclass
class LoRAConfig:
    # Rank of the update dW = B @ A, with A: (r, in) and B: (out, r).
    r: int = 8
    # Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with use_rslora).
    alpha: float = 16.0
    # Dropout probability on the adapter's input only (the base path never sees dropout).
    dropout: float = 0.0
    # Which modules to wrap: a list of names (each must match at least one module, exactly or as a
    # dotted suffix: "q_proj" matches "model.layers.0.self_attn.q_proj"), one regex string that must
    # fullmatch a module's dotted name, or "all-linear" (every nn.Linear but the output head).
    targets: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Modules never to wrap, even when a target matches them: a list of names (same matching) or a regex.
    exclude: list[str] | str | None = None
    # Only wrap modules inside these layer indices; None = all. A module's layer index is peft's
    # (layers_to_transform without layers_pattern): the first number that is a whole dotted segment
    # after two or more others, `model.layers.3.mlp.up_proj` -> 3, `encoder.block.1.layer.0.wi` -> 1.
    # A name with no such number (a top-level `layers.3.fc`) is in no layer: use a regex target there.
    layers: list[int] | None = None
    # Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023) instead of alpha / r.
    use_rslora: bool = False
    # Init of A: "kaiming" (Kaiming-uniform, a=sqrt(5), as nn.Linear) or "gaussian" (N(0, 1/r), as
    # peft's init_lora_weights="gaussian"). B always starts at zero, so a fresh adapter changes nothing.
    init: str = "kaiming"
    # Per-module rank overrides: {pattern: r}; a pattern matches a module whose name ends in it on a
    # dot boundary, as a regex (peft's rule). Needed to read adapters written by peft.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    # Per-module alpha overrides, same matching as rank_pattern.
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    # Bias training: only "none" is supported (the base bias stays frozen, as peft's default).
    bias: str = "none"

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRAConfig.r must be a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"LoRAConfig.init must be one of {INITS}, got {self.init!r}")
        if self.bias != "none":
            raise ValueError(f"LoRAConfig.bias={self.bias!r} is not supported; use bias='none'")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if not self.targets:
            raise ValueError(
                "LoRAConfig.targets is empty; name the modules to adapt, e.g. ['q_proj', 'v_proj']"
            )
        if isinstance(self.targets, str):
            if self.targets != "all-linear":
                _compile(self.targets, "targets")
        elif isinstance(self.targets, list):
            bad = [t for t in self.targets if not isinstance(t, str) or not t]
            if bad:
                raise ValueError(f"LoRAConfig.targets entries must be non-empty strings, got {bad!r}")
        else:
            raise ValueError(
                f"LoRAConfig.targets must be a list of names or a regex string, got {self.targets!r}"
            )
        if isinstance(self.exclude, str):
            _compile(self.exclude, "exclude")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = [self.layers]
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                raise ValueError(f"LoRAConfig.layers must be non-negative layer indices, got {self.layers!r}")
        for key, value in self.rank_pattern.items():
            _compile(key, "rank_pattern")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"LoRAConfig.rank_pattern[{key!r}] must be > 0 and an integer (a rank), got {value!r}"
                )
        for key, value in self.alpha_pattern.items():
            _compile(key, "alpha_pattern")
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"LoRAConfig.alpha_pattern[{key!r}] must be > 0, got {value!r}")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """The (r, alpha) for the module called `name`, after rank_pattern/alpha_pattern."""
        r = self.rank_pattern.get(match_pattern_key(self.rank_pattern, name), self.r)
        alpha = self.alpha_pattern.get(match_pattern_key(self.alpha_pattern, name), self.alpha)
        return r, float(alpha)


def match_pattern_key(patterns: dict, name: str) -> str | None:
    """peft's rank_pattern rule: the first key that, as a regex, matches the end of `name` on a dot
    boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoRAConfig.{what}: {pattern!r} is not a valid regular expression ({e})") from None
