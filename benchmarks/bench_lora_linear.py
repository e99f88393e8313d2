"""Fused LoRA linear vs the base GEMM, an unfused PyTorch LoRA and peft, on Gemma's projection shapes.

    python benchmarks/bench_lora_linear.py            # 3 models x 7 projections x r in {8, 16, 64}
    python benchmarks/bench_lora_linear.py --quick    # gemma-3-1b, r = 16
    python benchmarks/bench_lora_linear.py --dry-run  # print the plan (works without a GPU)

Every time is the median of triton.testing.do_bench (warmup, L2 flushed between runs), for 4096
tokens in bfloat16. "fwd" is y = layer(x); "fwd+bwd" adds the backward: the input gradient for the
base layer (its weight is frozen), the input gradient and both LoRA gradients for the LoRA layers
(torch.autograd.grad, so nothing accumulates into .grad). Columns other than the base are ratios to
the base layer. Goals: fwd <= 1.05x the base GEMM; fwd+bwd <= 1.10x the base layer's fwd+bwd;
faster than peft everywhere.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

# (hidden, query heads, kv heads, head_dim, intermediate) from the models' config.json
MODELS = {
    "gemma-3-1b": (1152, 4, 1, 256, 6912),
    "gemma-7b": (3072, 16, 16, 256, 24576),
    "gemma-2-9b": (3584, 16, 8, 256, 14336),
}
GOAL_FWD, GOAL_FWD_BWD = 1.05, 1.10


def projection_shapes(model: str) -> list[tuple[str, int, int]]:
    """(names, in, out) for the seven projections, projections of equal shape merged."""
    d, heads, kv, hd, inter = MODELS[model]
    projections = [
        ("q", d, heads * hd), ("k", d, kv * hd), ("v", d, kv * hd), ("o", heads * hd, d),
        ("gate", d, inter), ("up", d, inter), ("down", inter, d),
    ]  # fmt: skip
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, n_in, n_out in projections:
        shapes.setdefault((n_in, n_out), []).append(name)
    return [("/".join(names), n_in, n_out) for (n_in, n_out), names in shapes.items()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 64])
    p.add_argument("--tokens", type=int, default=4096, help="rows of x (batch x sequence)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout p (training mode)")
    p.add_argument("--quick", action="store_true", help="gemma-3-1b at r=16 only")
    p.add_argument("--no-peft", action="store_true", help="skip peft even if it is installed")
    p.add_argument(
        "--shrink",
        choices=["auto", "in-loop", "separate"],
        default="auto",
        help="where minilora computes x @ A.T / dy @ B: its heuristic, the GEMM's K loop, or its own pass",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.ranks = ["gemma-3-1b"], [16]
    return args


def plan(args) -> list[tuple[str, str, int, int, int]]:
    return [
        (model, names, n_in, n_out, r)
        for model in args.models
        for names, n_in, n_out in projection_shapes(model)
        for r in args.ranks
    ]


# ----------------------------------------------------------------------------------------------------
# The contenders: each returns (forward, forward+backward) closures over the same inputs
# ----------------------------------------------------------------------------------------------------
def contenders(x, W, A, B, s, p, dy, use_peft, fuse_shrink=None):
    from minilora.kernels import lora_linear

    def timed(forward, inputs):
        def fwd_bwd():
            torch.autograd.grad(forward(), inputs, dy)

        def fwd():
            with torch.no_grad():
                forward()

        return fwd, fwd_bwd

    def unfused():
        h = F.dropout(x, p, training=p > 0)
        return F.linear(x, W) + s * F.linear(F.linear(h, A), B)

    out = {
        "base": timed(lambda: F.linear(x, W), [x]),
        "torch": timed(unfused, [x, A, B]),
        "minilora": timed(
            lambda: lora_linear(x, W, None, A, B, s, p, p > 0, fuse_shrink=fuse_shrink), [x, A, B]
        ),
    }
    if use_peft:
        import peft

        # through get_peft_model (stable across peft versions), then the injected lora.Linear itself
        holder = torch.nn.Module()
        holder.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=x.device, dtype=x.dtype)
        holder.proj.weight.data.copy_(W)
        cfg = peft.LoraConfig(
            r=A.shape[0], lora_alpha=s * A.shape[0], lora_dropout=p, target_modules=["proj"]
        )
        layer = peft.get_peft_model(holder, cfg).base_model.model.proj
        layer = layer.to(x.dtype).train(p > 0)  # adapters in bf16 too: the same arithmetic as the others
        params = [prm for prm in layer.parameters() if prm.requires_grad]
        out["peft"] = timed(lambda: layer(x), [x, *params])
    return out


def bench_one(n_tokens, n_in, n_out, r, p, use_peft, fuse_shrink=None):
    from triton.testing import do_bench

    g = torch.Generator("cuda").manual_seed(0)
    rand = lambda *shape, std=1.0: (std * torch.randn(*shape, device="cuda", generator=g)).to(torch.bfloat16)
    x = rand(n_tokens, n_in).requires_grad_()
    W = rand(n_out, n_in, std=n_in**-0.5)
    A = rand(r, n_in, std=n_in**-0.5).requires_grad_()
    B = rand(n_out, r, std=0.02).requires_grad_()
    dy = rand(n_tokens, n_out)
    fns = contenders(x, W, A, B, 2.0, p, dy, use_peft, fuse_shrink)
    if p == 0:  # sanity: the fused output is the unfused one up to bf16 rounding
        with torch.no_grad():
            from minilora.kernels import lora_linear

            fused = lora_linear(x, W, None, A, B, 2.0).float()
            ref = (F.linear(x, W) + 2.0 * F.linear(F.linear(x, A), B)).float()
            rel = ((fused - ref).norm() / ref.norm()).item()
        if rel > 1e-2:
            raise RuntimeError(f"fused output differs from the unfused one: relative error {rel:.3g}")
    times = {}
    for name, (fwd, fwd_bwd) in fns.items():
        times[name] = (
            do_bench(fwd, warmup=10, rep=40, return_mode="median"),
            do_bench(fwd_bwd, warmup=10, rep=40, return_mode="median"),
        )
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = plan(args)
    try:
        import peft  # noqa: F401

        have_peft = not args.no_peft
    except ImportError:
        have_peft = False
    print(
        f"{len(rows)} shapes x ({'base, torch, peft, minilora' if have_peft else 'base, torch, minilora'}) "
        f"x (fwd, fwd+bwd); {args.tokens} tokens, bf16, dropout {args.dropout}, shrink {args.shrink}"
    )
    if args.dry_run:
        for model, names, n_in, n_out, r in rows:
            print(f"  {model:<11} {names:<10} {n_in:>6} -> {n_out:<6} r={r}")
        return 0
    if not torch.cuda.is_available():
        print("bench_lora_linear.py needs a CUDA GPU (Triton kernels); --dry-run prints the plan.")
        return 1

    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    names = ["torch", "peft", "minilora"] if have_peft else ["torch", "minilora"]
    hdr = "".join(f"{n:>9}" for n in names)
    print(
        f"\n{'model':<11} {'proj':<10} {'in->out':>12} {'r':>3} | {'base ms':>8}{hdr}  fwd<={GOAL_FWD} "
        f"| {'base ms':>8}{hdr}  f+b<={GOAL_FWD_BWD}"
    )
    met = dict(fwd=0, fwd_bwd=0, peft=0)
    for model, proj, n_in, n_out, r in rows:
        fuse = {"auto": None, "in-loop": True, "separate": False}[args.shrink]
        t = bench_one(args.tokens, n_in, n_out, r, args.dropout, have_peft, fuse)
        cells = []
        for i, goal in ((0, GOAL_FWD), (1, GOAL_FWD_BWD)):
            base = t["base"][i]
            ratios = {n: t[n][i] / base for n in names}
            ok = ratios["minilora"] <= goal
            met["fwd" if i == 0 else "fwd_bwd"] += ok
            if have_peft:
                met["peft"] += t["minilora"][i] < t["peft"][i]
            cells.append(
                f"{base:8.3f}"
                + "".join(f"{ratios[n]:8.3f}x" for n in names)
                + f"  {'ok' if ok else 'MISS':>9}"
            )
        print(f"{model:<11} {proj:<10} {f'{n_in}->{n_out}':>12} {r:>3} | " + " | ".join(cells), flush=True)
    n = len(rows)
    summary = f"forward <= {GOAL_FWD}x base GEMM: {met['fwd']}/{n}"
    print(f"\n{summary}; fwd+bwd <= {GOAL_FWD_BWD}x base fwd+bwd: {met['fwd_bwd']}/{n}")
    if have_peft:
        print(f"faster than peft: {met['peft']}/{2 * n} (fwd and fwd+bwd)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
