"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update (Hu et al. 2021).

    y = x @ W.T + b + scaling * dropout(x) @ A.T @ B.T,   A: (r, in), B: (out, r)

scaling = alpha / r, or alpha / sqrt(r) with rank-stabilised LoRA (Kalajdzievski 2023).

Init: A is Kaiming-uniform with a=sqrt(5) (nn.Linear's own init), or N(0, 1/r) with init="gaussian";
B is zero. So a freshly wrapped layer computes exactly what the base layer computes.

State-dict keys: the wrapper owns the base layer's `weight` and `bias` Parameters directly (same
objects, no copy), so a wrapped model keeps the base checkpoint's keys (`...q_proj.weight`) and adds
`...q_proj.lora_A` and `...q_proj.lora_B`; peft's file keys are these plus `.weight` (adapter.py).

Adapter weights are float32 by default even for a bf16/fp16 base (peft does the same); the adapter
product runs in the activation dtype, with the weights cast on the fly (autograd routes the gradient
back to the float32 parameters).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from minilora.config import check
from minilora.quant import Linear4bit, linear_4bit, load_quant_state

# How LoRALinear computes its forward and backward. "torch": plain PyTorch (the equation below, as peft).
# "triton", "hybrid", "composite": the fused op of minilora.kernels with that plan (kernels/lora_linear.py
# explains each). "auto": _AUTO_CUDA for CUDA tensors, "torch" otherwise. Set by MINILORA_BACKEND or
# set_backend(); on CPU the kernel plans need TRITON_INTERPRET=1 (tests).
BACKENDS = ("auto", "torch", "triton", "hybrid", "composite")
_AUTO_CUDA = "composite"  # the GPU probe's decision (kernels/lora_linear.py, 5.; benchmarks/RESULTS.md)
_backend = os.environ.get("MINILORA_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"MINILORA_BACKEND={_backend!r}; expected one of {BACKENDS}")


def set_backend(name: str) -> None:
    """Choose the LoRA forward path for every LoRALinear: one of BACKENDS."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def _plan(x: torch.Tensor) -> str | None:
    """The kernel plan for x, or None for plain PyTorch."""
    if _backend == "auto":
        return _AUTO_CUDA if x.is_cuda else None
    return None if _backend == "torch" else _backend


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Linear,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_dtype: torch.dtype | None = torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        settings = dict(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init)
        for setting, value in settings.items():
            check(setting, value, f"LoRALinear: {setting}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        self.set_scaling(alpha, use_rslora)
        # The base layer's own Parameters, frozen: keys stay `weight` / `bias`.
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        # A 4-bit base (QLoRA): `weight` is its packed codes; `quant_state` (same keys) turns them into W0
        self.quant_state = base.quant_state if isinstance(base, Linear4bit) else None
        if self.quant_state is not None:
            self.register_load_state_dict_pre_hook(load_quant_state)
        w_dtype = base.weight.dtype if self.quant_state is None else self.quant_state.dtype
        factory = dict(device=base.weight.device, dtype=adapter_dtype or w_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.init = init
        self.merged = False  # W holds W0 + scaling * B @ A
        self.disabled = False  # forward is the base layer's (see minilora.disabled)
        # W0's exact bits while merged, so unmerge restores them bit for bit (not W - dW, which drifts).
        self.register_buffer("_unmerged_weight", None, persistent=False)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        if self.lora_A.device.type == "meta":
            return
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def set_scaling(self, alpha: float, use_rslora: bool = False) -> None:
        check("alpha", alpha, "LoRALinear: alpha")
        if getattr(self, "merged", False):
            raise RuntimeError("unmerge before changing the scaling of a merged LoRA layer")
        self.alpha, self.use_rslora = float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)

    @property
    def dropout_p(self) -> float:
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen product x @ W0.T + b (W0 dequantized on the fly from a 4-bit base)."""
        if self.quant_state is not None:
            return linear_4bit(x, self.weight, self.quant_state, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_forward(x)
        if self.quant_state is not None:  # a 4-bit base (the kernels take a dense W): as the composite
            x2 = x.reshape(-1, x.shape[-1])  # plan, the rank-r term accumulated by the same cuBLAS call
            y = self.base_forward(x2)  # (M, out), dequantized W; then y += s * (h @ A.T) @ B.T
            xa = F.linear(self.dropout(x2), self.lora_A.to(x.dtype)).to(y.dtype)
            y = y.addmm_(xa, self.lora_B.to(y.dtype).t(), alpha=self.scaling)
            return y.view(*x.shape[:-1], self.out_features)
        plan = _plan(x)
        if plan is not None:  # float32 adapters go in as they are: the kernels cast their tiles
            from minilora.kernels import lora_linear

            args = (x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, self.dropout_p)
            return lora_linear(*args, self.training, plan=plan)
        A, B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(self.dropout(x), A), B)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """dW = scaling * B @ A, shape (out, in): the one source of the update. Computed in float32,
        or float64 where the adapters or the base weight are float64."""
        dtype = torch.promote_types(torch.promote_types(self.lora_A.dtype, self.weight.dtype), torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W0 + dW, summed in the wider of float32/W's dtype and rounded once to W's dtype (merge and
        merged_state_dict both use this). Raises ValueError if the rounded result is not finite: a
        NaN in A/B, or a finite float32 sum that overflows a float16 W."""
        w0 = self._unmerged_weight if self.merged else self.base_weight()
        delta = self.delta_weight()
        merged = (w0.to(delta.dtype) + delta).to(w0.dtype)
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging this LoRA update would put NaN/Inf values in the {w0.dtype} base weight "
                "(NaN/Inf in lora_A/lora_B, or W + dW out of the dtype's range); refusing to merge"
            )
        return merged

    @torch.no_grad()
    def base_weight(self) -> torch.Tensor:
        """W0 (out, in), dequantized (in the dtype it was quantized from) for a 4-bit base."""
        return self.weight if self.quant_state is None else self.quant_state.dequantize(self.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W0 + dW (see merged_weight). A no-op when already merged. Keeps a copy of W0 so that
        unmerge is bit-exact: while merged, each adapted weight takes twice its memory;
        minilora.merged_state_dict exports merged weights without that copy."""
        if self.quant_state is not None:
            raise ValueError(
                "cannot merge into a 4-bit base weight: re-quantizing W0 + dW would silently change the "
                "base weights. Use minilora.merged_state_dict(model) for merged weights in the compute dtype"
            )
        if self.merged:
            return
        merged = self.merged_weight()
        self._unmerged_weight = self.weight.detach().clone()
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 bit for bit. A no-op when not merged."""
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, rslora={self.use_rslora}, dropout={self.dropout_p}, merged={self.merged}"
        )
