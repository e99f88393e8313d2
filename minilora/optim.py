"""AdamW with 8-bit moments (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"),
bit for bit bitsandbytes' AdamW8bit on the CPU.

AdamW (Loshchilov & Hutter 2019) for gradient g at step t, decoupled weight decay:

    m = b1 m + (1 - b1) g,    v = b2 v + (1 - b2) g^2
    p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Between steps m and v are stored as 8-bit codes in blocks of 256 values, each block scaled by its
absmax (minilora.quant.quantize_8bit): m in the signed dynamic code, v (>= 0) in the unsigned one, so
1 + 1 bytes per parameter (+ 8 bytes of absmax per 256) instead of 4 + 4. Every step dequantizes to
float32, updates, and quantizes again. Tensors with fewer than `min_8bit_size` (4096) values keep
float32 moments, as bitsandbytes does: their state is small, and few blocks would share a scale.

A separate file from quant.py: this is training state, used by train.py; it shares only the 8-bit
blockwise code with the 4-bit weights.
"""

from __future__ import annotations

import math
from itertools import chain

import torch

from minilora.quant import dequantize_8bit, dynamic_map, quantize_8bit


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments are 8-bit blockwise codes (see the module docstring). State per parameter:
    `step`, `exp_avg` and `exp_avg_sq` (uint8 codes, with `exp_avg_absmax` / `exp_avg_sq_absmax`
    float32 per block of 256; or float32 tensors below min_8bit_size)."""

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, min_8bit_size=4096
    ):
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"AdamW8bit: need lr, eps, weight_decay >= 0 and betas in [0, 1); got "
                             f"lr={lr}, eps={eps}, weight_decay={weight_decay}, betas={betas}")  # fmt: skip
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.min_8bit_size = min_8bit_size

    def _init_state(self, p: torch.Tensor) -> dict:
        if p.numel() < self.min_8bit_size:
            zeros = lambda: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            return dict(step=0, exp_avg=zeros(), exp_avg_sq=zeros())
        codes = lambda: torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.contiguous_format)
        absmax = lambda: torch.zeros(math.ceil(p.numel() / 256), device=p.device)  # one per block of 256
        state = dict(step=0, exp_avg=codes(), exp_avg_absmax=absmax())
        return dict(state, exp_avg_sq=codes(), exp_avg_sq_absmax=absmax())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not take sparse gradients")
                if not self.state[p]:
                    self.state[p] = self._init_state(p)
                state = self.state[p]
                state["step"] += 1
                if state["exp_avg"].dtype == torch.uint8:
                    self._step_8bit(p, state, **group)
                else:
                    self._step_32bit(p, state, **group)
        return loss

    @staticmethod
    def _step_8bit(p, state, lr, betas, eps, weight_decay, **_):
        (b1, b2), t = betas, state["step"]
        m = dequantize_8bit(state["exp_avg"], state["exp_avg_absmax"], dynamic_map(True, p.device))
        v = dequantize_8bit(state["exp_avg_sq"], state["exp_avg_sq_absmax"], dynamic_map(False, p.device))
        g, p32 = p.grad.float(), p.float()  # p32 is p itself for a float32 parameter
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(1.0 - b2**t)).add_(eps)
        if weight_decay > 0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.addcdiv_(m, denom, value=-lr / (1.0 - b1**t))
        if p32 is not p:
            p.copy_(p32)
        state["exp_avg"], state["exp_avg_absmax"] = quantize_8bit(m, signed=True)
        state["exp_avg_sq"], state["exp_avg_sq_absmax"] = quantize_8bit(v, signed=False)

    @staticmethod
    def _step_32bit(p, state, lr, betas, eps, weight_decay, **_):
        # the same AdamW with the bias corrections folded into the step size, as bitsandbytes writes
        # its 32-bit path (the two forms round differently; each is bnb's, so both match it)
        (b1, b2), t = betas, state["step"]
        m, v, g, p32 = state["exp_avg"], state["exp_avg_sq"], p.grad.float(), p.float()
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        c2 = math.sqrt(1.0 - b2**t)
        if weight_decay > 0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / (1.0 - b1**t))
        if p32 is not p:
            p.copy_(p32)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts floating state to each parameter's dtype, and would turn the uint8 codes
        # (and the float32 absmax of a bf16 parameter) into floats: restore every tensor as saved
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = dict(
            zip(saved_ids, chain.from_iterable(g["params"] for g in self.param_groups), strict=True)
        )
        for index, saved in state_dict["state"].items():
            p = params[index]
            self.state[p] = {
                k: v.to(p.device, copy=True) if torch.is_tensor(v) else v for k, v in saved.items()
            }
