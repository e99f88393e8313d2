"""Tiny random Hugging Face Gemma models (transformers, the test-only oracle) for the model-side tests.

The test files load it by its path (see their imports)."""

import torch

VOCAB = 300
TINY = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=128, vocab_size=VOCAB)
# name -> (config class, model class, tiny settings covering the generation's layer pattern)
KINDS = {
    "gemma1-mha": ("GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=2, num_key_value_heads=4)),
    "gemma1-mqa": ("GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=2, num_key_value_heads=1)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=5)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_hidden_layers=7, num_key_value_heads=2, sliding_window=5)),
    "gemma3-linear8": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(num_hidden_layers=7, num_key_value_heads=1, sliding_window=5,
             rope_scaling={"rope_type": "linear", "factor": 8.0}),
    ),
}  # fmt: skip


def hf_tiny(kind: str, seed: int = 0, std: float = 0.05, **overrides):
    """A tiny random transformers model of `kind`. Every parameter is random (norm weights too, with
    std 0.2, so the (1 + w) offsets and q/k norms are exercised); eager attention is the reference."""
    import transformers

    config_cls, model_cls, settings = KINDS[kind]
    config = getattr(transformers, config_cls)(
        **{**TINY, **settings, **overrides}, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2 if "norm" in name else std)
    return model
