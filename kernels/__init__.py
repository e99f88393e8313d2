"""Triton kernels for LoRA, installed as minilora.kernels (see setup.py)."""

from .dequant import dequantize_4bit_triton
from .lora_linear import PLANS, LoRALinearFunction, dropout_mask, lora_linear

__all__ = ["PLANS", "LoRALinearFunction", "dequantize_4bit_triton", "dropout_mask", "lora_linear"]
