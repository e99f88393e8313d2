"""Greedy decoding speed on the real Gemma 3 270M (float32, CPU): minilora vs transformers.

    python benchmarks/bench_generate.py [--new-tokens 64] [--repeats 3] [--model DIR] [--gguf]

Both load the same converted folder (minilora.gguf.default_model_dir()) in float32 and decode
greedily with their KV cache, exactly --new-tokens tokens each (no stop token), prefill included.
Runs alternate between the sides so a noisy machine slows all alike; the median is reported. The
generated token ids must agree, or the comparison would be between different work.

--gguf adds minilora on the Q4_K_M file the folder was converted from, kept packed: once as
generate_ids runs it (every weight dequantized once per call: quant.keep_dequantized), once with
no budget to keep anything (every weight dequantized once per token, as in a training step).
"""

import argparse
import statistics
import time

import torch

import minilora
from minilora.generate import generate_ids

PROMPT = "The capital of France is"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gguf", action="store_true", help="also minilora on the packed GGUF file")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    from minilora.gguf import default_model_dir
    from minilora.tokenizer import Tokenizer

    path = args.model or default_model_dir()
    tok = Tokenizer(path)
    prompt_ids = tok.encode(PROMPT)
    ours = minilora.gemma.from_pretrained(path, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # decode exactly --new-tokens tokens
    n = args.new_tokens

    def run_ours():
        return generate_ids(ours, prompt_ids, max_new_tokens=n)

    def run_theirs():
        with torch.inference_mode():
            out = theirs.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt_ids) :].tolist()

    sides = {"minilora": run_ours, "transformers": run_theirs}
    if args.gguf:
        from minilora.gguf import default_gguf

        packed = minilora.gguf.load_model(default_gguf(), dtype=torch.float32)

        def run_packed(budget=None):
            with minilora.quant.keep_dequantized(budget):  # generate_ids' own block joins this one
                return generate_ids(packed, prompt_ids, max_new_tokens=n)

        sides.update({"gguf kept": run_packed, "gguf per token": lambda: run_packed(0)})
    a, b = run_ours(), run_theirs()  # warm-up, and the check that both do the same work
    agree = sum(x == y for x, y in zip(a, b, strict=True))
    for name in ("gguf kept", "gguf per token") if args.gguf else ():
        print(f"{name}: greedy tokens agree with the folder's: {sum(map(int.__eq__, sides[name](), a))}/{n}")
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    print(
        f"Gemma 3 270M, float32, {torch.get_num_threads()} threads, prompt {len(prompt_ids)} tokens, {n} new"
    )
    print(f"greedy tokens agree: {agree}/{n}; continuation: {tok.decode(a)!r}")
    for k, v in times.items():
        print(f"{k:>14}: {rate[k]:6.1f} tokens/s  (runs: {', '.join(f'{t:.2f}s' for t in v)})")
    print(f"minilora / transformers: {rate['minilora'] / rate['transformers']:.2f}x")
    if args.gguf:
        print(f"gguf kept / gguf per token: {rate['gguf kept'] / rate['gguf per token']:.2f}x")


if __name__ == "__main__":
    main()
