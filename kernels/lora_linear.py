"""Fused LoRA linear (placeholder: plain PyTorch until the Triton kernel lands)."""

import torch.nn.functional as F


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=False):
    h = F.dropout(x, dropout_p, training) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(h, lora_A), lora_B)
