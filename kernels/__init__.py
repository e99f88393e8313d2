"""Triton kernels for LoRA, installed as minilora.kernels (see setup.py)."""

from .lora_linear import lora_linear

__all__ = ["lora_linear"]
