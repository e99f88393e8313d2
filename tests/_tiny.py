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


def tiny_folder(path, seed: int = 0):
    """A tiny random Gemma 3 as a Hugging Face style folder (config.json, model.safetensors and a
    SentencePiece tokenizer.model trained here), written by minilora alone: what the command-line
    tests run examples/train_gemma.py on, in seconds."""
    import io
    import json
    from pathlib import Path

    import sentencepiece as spm
    from safetensors.torch import save_file

    from minilora.checkpoint import config_from_hf
    from minilora.gemma import Gemma

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([f"{a}+{b}={a + b}" for a in range(40) for b in range(40)]),
        model_writer=model, model_type="bpe", vocab_size=300, hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, add_dummy_prefix=False, normalization_rule_name="identity", minloglevel=2,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"],
    )  # fmt: skip
    (path / "tokenizer.model").write_bytes(model.getvalue())
    vocab = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    config = dict(model_type="gemma3_text", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  query_pre_attn_scalar=16, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    gemma = Gemma(config_from_hf(config))
    with torch.no_grad():
        for p in gemma.parameters():
            p.normal_(std=0.3 if p.dim() == 2 else 0.1)
    save_file({k: v.contiguous() for k, v in gemma.state_dict().items()}, path / "model.safetensors")
    return path
