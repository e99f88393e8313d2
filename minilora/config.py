"""LoRAConfig: what to adapt and how (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Field names follow loralib/peft where they exist (`r`, `alpha` = peft's `lora_alpha`,
`rank_pattern`, `alpha_pattern`), so a peft `adapter_config.json` maps onto this one to one.
"""

from __future__ import annotations

import math
import re
from dataclasses import InitVar, dataclass, field

INITS = ("kaiming", "gaussian")


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return (_integer(x) or isinstance(x, float)) and math.isfinite(x)


# What each LoRA setting must be: (test, the valid values in words).
RULES = {
    "r": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "alpha": (lambda v: _number(v) and v > 0, "a number > 0"),
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool (true/false)"),
    "init": (lambda v: v in INITS, f"one of {INITS}"),
}


def check(setting: str, value, name: str) -> None:
    """The one check of a LoRA setting (a key of RULES), made wherever a value enters: LoRAConfig,
    LoRALinear and adapter files. Inside, the code trusts it. `name` is the value as its user wrote
    it ("LoRAConfig.alpha", "adapter_config.json: lora_alpha"); the error names it and the fix."""
    test, valid = RULES[setting]
    if not test(value):
        raise ValueError(f"{name} must be {valid}, got {value!r}")


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
    # (minilora.inject.layer_index states the rule); a name with no index is in no layer.
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
    # peft's LoraConfig names of alpha, targets and dropout: given, an error that names minilora's.
    lora_alpha: InitVar[float | None] = None
    target_modules: InitVar[list[str] | str | None] = None
    lora_dropout: InitVar[float | None] = None

    def __post_init__(self, lora_alpha, target_modules, lora_dropout):
        peft = {"lora_alpha": (lora_alpha, "alpha"), "target_modules": (target_modules, "targets"),
                "lora_dropout": (lora_dropout, "dropout")}  # fmt: skip
        renames = [f"{ours}=, not peft's {name}=" for name, (v, ours) in peft.items() if v is not None]
        if renames:
            raise TypeError(f"LoRAConfig takes {'; '.join(renames)}")
        for setting in RULES:
            check(setting, getattr(self, setting), f"LoRAConfig.{setting}")
        for what, patterns, setting in (("rank_pattern", self.rank_pattern, "r"),
                                        ("alpha_pattern", self.alpha_pattern, "alpha")):  # fmt: skip
            for key, value in patterns.items():
                _compile(key, what)
                check(setting, value, f"LoRAConfig.{what}[{key!r}]")
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
        elif not isinstance(self.targets, list) or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"LoRAConfig.targets must be a list of non-empty module names or one regex string, "
                f"got {self.targets!r}"
            )
        if isinstance(self.exclude, str):
            _compile(self.exclude, "exclude")
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.layers is not None and not all(_integer(i) and i >= 0 for i in self.layers):
            raise ValueError(f"LoRAConfig.layers must be non-negative layer indices, got {self.layers!r}")

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
