"""minilora: LoRA for PyTorch and the Gemma family, written from scratch. The whole public API:

model = minilora.gemma.from_pretrained(ckpt_dir)          # Gemma 1, 2 or 3
names = minilora.inject(model, minilora.LoRAConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
minilora.save_adapter(model, out_dir); minilora.load_adapter(model, out_dir)   # peft's format
minilora.merge(model); minilora.unmerge(model); with minilora.disabled(model): ...
model = minilora.gemma.from_pretrained(ckpt_dir, quantize="nf4")   # QLoRA: 4-bit base (minilora.quant)
minilora.quantize_model(any_model); minilora.AdamW8bit(params)     # any model's nn.Linear; 8-bit moments

Importing it needs torch alone: sentencepiece is imported when a Tokenizer is built, safetensors
when adapter files are read or written, numpy and `gguf` by minilora.gguf, triton by minilora.kernels.
"""

from minilora import gemma
from minilora.adapter import load_adapter, read_adapter, save_adapter
from minilora.config import LoRAConfig
from minilora.generate import generate
from minilora.inject import (
    count_parameters,
    disabled,
    find_targets,
    freeze_base,
    inject,
    merge,
    merged_state_dict,
    unmerge,
)
from minilora.lora import LoRALinear, get_backend, set_backend
from minilora.optim import AdamW8bit
from minilora.quant import Linear4bit, quantize_model
from minilora.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AdamW8bit", "Linear4bit", "LoRAConfig", "LoRALinear", "Tokenizer", "count_parameters", "disabled",
    "find_targets", "freeze_base", "gemma", "generate", "get_backend", "inject", "load_adapter", "merge",
    "merged_state_dict", "quantize_model", "read_adapter", "save_adapter", "set_backend", "unmerge",
]  # fmt: skip
