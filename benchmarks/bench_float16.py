"""Float16 compute on the real Gemma 3 270M, against float32, on one long prompt (the README's first
--tokens tokens). Three float16 forwards of the same float16 weights:

  mode      minilora's float16 compute: float16 matmuls, float32 residual stream (gemma.py's docstring)
  naive     everything in float16, the residual stream too (minilora before it; transformers' float16)
  scaled    the alternative: a float16 residual stream scaled by --scale (a power of two, exact) at its
            two writers, the embedding and the post-norms; the norms that read it are scale-invariant

Prints, per variant: finite or not, max |logit - float32's| in units of float16's epsilon x max |logit|,
the mean cross-entropy, the share of positions whose argmax agrees with float32, and the seconds.

    python benchmarks/bench_float16.py --tokens 1024
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import minilora as ml
from minilora import gemma
from minilora.gguf import default_model_dir


def run(model, ids, variant: str, scale: float):
    hooks = []
    if variant != "mode":
        gemma.stream_dtype = lambda dtype: dtype  # the residual stream in the compute dtype
    if variant == "scaled":
        scaled = [model.model.embed_tokens]
        for layer in model.model.layers:
            scaled += [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
        hooks = [m.register_forward_hook(lambda mod, args, out: out * scale) for m in scaled]
    try:
        start = time.perf_counter()
        with torch.no_grad():
            logits = model(ids)
        return logits, time.perf_counter() - start
    finally:
        gemma.stream_dtype = STREAM_DTYPE
        for h in hooks:
            h.remove()


STREAM_DTYPE = gemma.stream_dtype


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--scale", type=float, default=0.25, help="residual scaling's factor (a power of two)")
    p.add_argument("--variants", default="mode,naive,scaled")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = default_model_dir()
    tok = ml.Tokenizer(path)
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    ids = torch.tensor([tok.encode(text)[: args.tokens]])
    loss = lambda z: F.cross_entropy(z[0, :-1], ids[0, 1:]).item()  # noqa: E731
    want, seconds = run(gemma.from_pretrained(path, dtype=torch.float32), ids, "mode", 1.0)
    unit = torch.finfo(torch.float16).eps * want.abs().max().item()
    top = want.abs().max().item()
    print(f"{ids.shape[1]} tokens; float32: loss {loss(want):.6f}, max |logit| {top:.2f}, {seconds:.0f} s")
    half = gemma.from_pretrained(path, dtype=torch.float16)
    print("| float16 variant | finite | max abs logit error (units) | loss | argmax agrees | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for variant in args.variants.split(","):
        got, seconds = run(half, ids, variant, args.scale)
        finite = bool(torch.isfinite(got).all())
        err = (got - want).abs().max().item() if finite else float("nan")
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        cells = (variant, finite, f"{err:.4f} ({err / unit:.2f})", f"{loss(got):.6f}", f"{agree:.2%}")
        print("| " + " | ".join(map(str, cells)) + f" | {seconds:.0f} |")
        del got


if __name__ == "__main__":
    main()
