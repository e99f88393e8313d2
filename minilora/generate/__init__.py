"""Text generation with a KV cache: prefill the prompt once, then one token per step.

    python -m minilora.generate --model DIR [--adapter DIR] [--max-new-tokens N] [--temperature T] "prompt"

With --adapter, the prompt is put in the format the adapter was trained with (save_adapter's
minilora_prompt.json, which minilora.train writes: a chat turn, Alpaca's instruction, a template);
--raw sends it as it is.

Greedy when temperature is 0; otherwise softmax(logits / temperature) restricted to the top_k
most likely tokens and/or the smallest set whose probability reaches top_p (nucleus sampling,
Holtzman et al. 2019). Generation stops at any of the tokenizer's stop ids (<eos>, <end_of_turn>).
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch

from minilora.quant import QUANT_TYPES, keep_dequantized

log = logging.getLogger(__name__)


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from float logits of shape (vocab,)."""
    if temperature == 0.0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def generate_ids(
    model,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: set[int] | frozenset[int] = frozenset(),
) -> list[int]:
    """The new token ids after `prompt_ids` (a stop id ends generation and is not returned)."""
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompt_ids:
        raise ValueError("the prompt has no tokens; generation needs at least <bos>")
    device = model.model.embed_tokens.weight.device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        with torch.inference_mode(), keep_dequantized():  # a packed base: dequantized once, not per token
            cache = model.new_cache()
            step_input = torch.tensor([list(prompt_ids)], device=device)  # (1, T): the prefill
            new: list[int] = []
            for _ in range(max_new_tokens):
                logits = model(step_input, cache=cache, last_logits_only=True)[0, -1]  # (vocab,)
                token = next_token(logits, temperature, top_k, top_p, generator)
                if token in stop_ids:
                    break
                new.append(token)
                step_input = torch.tensor([[token]], device=device)  # (1, 1)
    finally:
        model.train(was_training)
    return new


def generate(
    model,
    tok,
    prompt_or_messages: str | list[dict],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
) -> str:
    """Continue a prompt (a str, encoded after <bos>) or a chat (a list of {"role", "content"}
    messages, put through the tokenizer's chat template with the model's turn opened). Returns the
    new text only."""
    if isinstance(prompt_or_messages, str):
        text = prompt_or_messages
    elif isinstance(prompt_or_messages, list):  # the chat template checks the messages
        text = tok.apply_chat_template(prompt_or_messages, add_generation_prompt=True)
    else:
        raise TypeError('generate takes a prompt string or a list of {"role": ..., "content": ...} messages')
    ids = tok.encode(text)  # one <bos> first, also when the chat template wrote it
    new = generate_ids(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, stop_ids=set(tok.stop_ids)
    )
    return tok.decode(new)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="minilora-generate", description="Generate text with a Gemma checkpoint."
    )
    p.add_argument("prompt", help="the prompt text")
    p.add_argument(
        "--model", default=None, help="Hugging Face checkpoint folder (default: the bundled Gemma 3 270M)"
    )
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (minilora's or peft's format)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user turn of the chat template")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, not in the adapter's format")
    p.add_argument(
        "--dtype", default="auto",
        help="auto (bf16 on a GPU and on a CPU with fast bf16 (AMX, AVX-512-BF16), float32 elsewhere), "
        "float32, bfloat16",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=QUANT_TYPES, default=None, help="4-bit base weights (QLoRA)")
    args = p.parse_args(argv)

    import minilora
    from minilora import gemma, tokenizer
    from minilora.data import generation_prompt

    logging.basicConfig(format="%(message)s")
    logging.getLogger("minilora.gguf").setLevel(logging.INFO)  # the first run's model conversion
    model_dir = args.model
    if model_dir is None:
        from minilora.gguf import default_model_dir

        model_dir = default_model_dir()
    if args.dtype == "auto":  # the choice, once, on stderr (stdout is the generated text)
        from minilora.checkpoint import resolve_dtype
        from minilora.cpu import auto_dtype_reason

        dtype = str(resolve_dtype("auto", torch.device(args.device))).removeprefix("torch.")
        sys.stderr.write(f"dtype {dtype} ({auto_dtype_reason(args.device)}; --dtype overrides)\n")
    model = gemma.from_pretrained(model_dir, dtype=args.dtype, device=args.device, quantize=args.quantize)
    tok = tokenizer.Tokenizer(model_dir)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    if args.adapter:
        minilora.load_adapter(model, args.adapter)
        trained = minilora.adapter.read_prompt(args.adapter)
        if trained and not (args.raw or args.chat):
            prompt = generation_prompt(args.prompt, trained["format"], trained.get("template"), tok=tok)
    text = generate(
        model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed
    )
    sys.stdout.write(text + "\n")
