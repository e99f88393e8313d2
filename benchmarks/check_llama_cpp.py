"""The llama.cpp round trip (issue 13): llama.cpp runs the real Gemma 3 270M Q4_K_M file with the LoRA
file minilora exported, and the merged files minilora wrote without any adapter; minilora runs its
adapted model on the same Q4_K_M file. Both must agree.

    python benchmarks/check_llama_cpp.py [--adapter runs/train_gemma/adapter] [--out runs/check_llama_cpp]

Needs `llama_cpp` (llama-cpp-python; README.md says how to build it on this CPU), and an adapter
trained on this base: examples/train_gemma.py writes the default one.

For every prompt, with the adapter and with each merged file: the greedy continuations (16 tokens) must
be equal, and the last-position logits close. They cannot be equal: llama.cpp rounds the activations
to 8 bits (Q8_K / Q8_0 blocks) before its quantized matrix products, and to float16 before float16
ones, where minilora multiplies float32 activations by the dequantized float32 weights. TOLERANCE
bounds the largest logit difference for each kind of product. The base model without an adapter,
compared the same way, shows the size of that rounding on its own (2026-11-28: up to 1.28, and one
continuation of 16 tokens that parts at its 15th), so it is printed, not required.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import minilora
from minilora.gguf import default_gguf, export_adapter, export_merged

HERE = os.path.dirname(os.path.abspath(__file__))
# max |logit difference| at the last position (the logits span about -30 .. 30): 8-bit activations
# into the quantized products (Q4_K_M, q8_0), 16-bit ones into float16 products
TOLERANCE = {"8-bit": 2.0, "f16": 0.1}
NEW_TOKENS = 16
EXTRA_PROMPTS = ["The capital of France is", "<start_of_turn>user\nName three colors.<end_of_turn>\n"
                 "<start_of_turn>model\n"]  # fmt: skip


def prompts(n: int) -> list[str]:
    """The first n held-out prompts of the bundled task, and two others."""
    with open(os.path.join(HERE, "..", "examples", "data", "dates_eval.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f][:n] + EXTRA_PROMPTS


@torch.inference_mode()
def minilora_run(model, ids: list[int], stop: set[int]) -> tuple[np.ndarray, list[int]]:
    """(float32 logits after the prompt, greedy continuation) with a KV cache."""
    cache, x, out, first = model.new_cache(), torch.tensor([ids]), [], None
    for _ in range(NEW_TOKENS):
        logits = model(x, cache=cache, last_logits_only=True)[0, -1]
        first = logits.numpy().copy() if first is None else first
        t = int(logits.argmax())
        if t in stop:
            break
        out.append(t)
        x = torch.tensor([[t]])
    return first, out


def llama_run(llm, ids: list[int], stop: set[int]) -> tuple[np.ndarray, list[int]]:
    """The same in llama.cpp, fed the same token ids."""
    llm.reset()
    llm.eval(ids)
    first, out = np.array(llm.scores[llm.n_tokens - 1]), []
    for _ in range(NEW_TOKENS):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if t in stop:
            break
        out.append(t)
        llm.eval([t])
    return first, out


def compare(label: str, ours: list, theirs: list, tok, tolerance: float) -> bool:
    """Print one line per prompt; True if every continuation is equal and every logit within tolerance."""
    ok = True
    for (la, ta), (lb, tb) in zip(ours, theirs, strict=True):
        diff = float(np.abs(la - lb).max())
        same = ta == tb
        ok &= same and diff <= tolerance
        print(f"  {label:22s} max |dlogit| {diff:6.3f} (of max |logit| {np.abs(la).max():5.1f})  "
              f"continuations {'equal' if same else 'DIFFER'}: {tok.decode(ta)!r}"
              + ("" if same else f" vs {tok.decode(tb)!r}"))  # fmt: skip
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapter", default="runs/train_gemma/adapter", help="a peft-format adapter folder")
    p.add_argument("--out", default="runs/check_llama_cpp", help="where the exported files go")
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts of the bundled task")
    p.add_argument("--threads", type=int, default=1, help="torch's and llama.cpp's (1: a shared machine)")
    args = p.parse_args()
    from llama_cpp import Llama  # README.md: how to build llama-cpp-python here

    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise SystemExit(f"no adapter in {args.adapter}: run examples/train_gemma.py, or pass --adapter")
    torch.set_num_threads(args.threads)
    base, out = str(default_gguf()), args.out
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    files = {"adapter": str(export_adapter(args.adapter, os.path.join(out, "adapter.gguf"), base=base))}
    for kind in ("f16", "q8_0"):
        files[kind] = str(export_merged(base, args.adapter, os.path.join(out, f"merged-{kind}.gguf"), kind))
    print(f"exported {', '.join(files.values())} in {time.perf_counter() - t:.0f} s")

    tok = minilora.Tokenizer(base)
    model = minilora.gemma.from_pretrained(base, dtype=torch.float32)
    texts = prompts(args.prompts)
    ids = [tok.encode(text) for text in texts]
    stop = set(tok.stop_ids)
    runs = {"base": [minilora_run(model, x, stop) for x in ids]}
    minilora.load_adapter(model, args.adapter)
    runs["adapted"] = [minilora_run(model, x, stop) for x in ids]
    print(f"prompts: {texts}")
    llama = dict(n_ctx=128, n_threads=args.threads, logits_all=True, verbose=False)
    checks = {  # what llama.cpp runs -> (the minilora run it must match, its tolerance)
        "base (no adapter)": (dict(model_path=base), "base", "8-bit"),
        "Q4_K_M + adapter.gguf": (dict(model_path=base, lora_path=files["adapter"]), "adapted", "8-bit"),
        "merged f16": (dict(model_path=files["f16"]), "adapted", "f16"),
        "merged q8_0": (dict(model_path=files["q8_0"]), "adapted", "8-bit"),
    }
    ok = True
    for label, (kw, ref, kind) in checks.items():
        llm = Llama(**kw, **llama)
        print(f"llama.cpp {label} vs minilora {ref} (tolerance {TOLERANCE[kind]}):")
        agree = compare(label, runs[ref], [llama_run(llm, x, stop) for x in ids], tok, TOLERANCE[kind])
        ok &= agree or ref == "base"  # the base comparison measures llama.cpp's rounding alone
        del llm
    changed = sum(a[1] != b[1] for a, b in zip(runs["base"], runs["adapted"], strict=True))
    print(f"the adapter changes {changed} of {len(ids)} continuations")
    print("PASS" if ok else "FAIL")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
