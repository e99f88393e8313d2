"""Triton kernels for LoRA, installed as minilora.kernels (see setup.py)."""

from .dequant import dequantize_4bit_triton
from .ggml_dequant import dequantize_ggml_triton
from .lora_linear import PLANS, LoRALinearFunction, dropout_mask, lora_linear

__all__ = [
    "PLANS",
    "LoRALinearFunction",
    "dequantize_4bit_triton",
    "dequantize_ggml_triton",
    "dropout_mask",
    "lora_linear",
]
