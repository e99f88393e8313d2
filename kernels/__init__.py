"""Triton kernels for LoRA, installed as minilora.kernels (see setup.py)."""

from .lora_linear import PLANS, LoRALinearFunction, dropout_mask, lora_linear

__all__ = ["PLANS", "LoRALinearFunction", "dropout_mask", "lora_linear"]
