"""Triton kernels for LoRA, installed as minilora.kernels (see setup.py)."""

from .lora_linear import LoRALinearFunction, dropout_mask, lora_linear

__all__ = ["LoRALinearFunction", "dropout_mask", "lora_linear"]
