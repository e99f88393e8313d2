"""Fused LoRA linear vs the base GEMM, an unfused PyTorch LoRA and peft, on Gemma's projection shapes.

    python benchmarks/bench_lora_linear.py            # 3 models x 7 projections x r in {8, 16, 64}
    python benchmarks/bench_lora_linear.py --quick    # gemma-3-1b, r = 16
    python benchmarks/bench_lora_linear.py --dry-run  # print the plan (works without a GPU)
    python benchmarks/bench_lora_linear.py --markdown results.md  # also write the summary table

Before timing a shape it checks minilora's op, with the shrink placement being timed, against the
unfused PyTorch LoRA (output and the x, A, B gradients, bf16 rounding apart). It ends with a Markdown
summary (device, torch and Triton versions, date, command line, one row per shape) for
benchmarks/RESULTS.md.

Every time is the median of triton.testing.do_bench (warmup, L2 flushed between runs), for 4096
tokens in bfloat16. "fwd" is y = layer(x); "fwd+bwd" adds the backward: the input gradient for the
base layer (its weight is frozen), the input gradient and both LoRA gradients for the LoRA layers
(torch.autograd.grad, so nothing accumulates into .grad). Columns other than the base are ratios to
the base layer. Goals: fwd <= 1.05x the base GEMM; fwd+bwd <= 1.10x the base layer's fwd+bwd;
faster than peft everywhere.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
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
    p.add_argument("--markdown", metavar="PATH", help="also write the final summary table to PATH")
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


def sanity_check(x, W, A, B, s, dy, fuse_shrink) -> list[str]:
    """minilora's output and gradients (x, A, B), with the shrink placement being timed, against the
    unfused PyTorch LoRA: equal up to bf16 rounding (relative error of each tensor < 1e-2). Returns the
    failures, e.g. ["dA 0.031"]."""
    from minilora.kernels import lora_linear

    fused = lambda: lora_linear(x, W, None, A, B, s, fuse_shrink=fuse_shrink)
    unfused = lambda: F.linear(x, W) + s * F.linear(F.linear(x, A), B)
    results = []
    for forward in (fused, unfused):
        y = forward()
        results.append([y.detach(), *torch.autograd.grad(y, [x, A, B], dy)])
    failures = []
    for name, got, ref in zip(("y", "dx", "dA", "dB"), *results, strict=True):
        got, ref = got.float(), ref.float()
        rel = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if not rel < 1e-2:
            failures.append(f"{name} {rel:.3g}")
    return failures


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
    # with dropout the two would draw different masks
    times = {"failures": sanity_check(x, W, A, B, 2.0, dy, fuse_shrink) if p == 0 else [], "checked": p == 0}
    for name, (fwd, fwd_bwd) in fns.items():
        times[name] = (
            do_bench(fwd, warmup=10, rep=40, return_mode="median"),
            do_bench(fwd_bwd, warmup=10, rep=40, return_mode="median"),
        )
    return times


def markdown_table(header: list[str], results: list[tuple], names: list[str]) -> str:
    """The summary for benchmarks/RESULTS.md: times in ms for the base layer, ratios for the others."""
    cols = ["model", "proj", "in->out", "r", "fwd base ms", *(f"fwd {n}" for n in names)]
    cols += ["f+b base ms", *(f"f+b {n}" for n in names), "goals fwd, f+b", "vs unfused"]
    lines = [*header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (model, proj, n_in, n_out, r), t in results:
        cells = [model, proj, f"{n_in}->{n_out}", str(r)]
        for i in (0, 1):
            cells += [f"{t['base'][i]:.3f}", *(f"{t[n][i] / t['base'][i]:.3f}x" for n in names)]
        cells.append(", ".join(t["goals"]))
        cells.append("FAIL " + ", ".join(t["failures"]) if t["failures"] else "ok" if t["checked"] else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", *sys.argv] if argv is None else ["bench_lora_linear.py", *argv])
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

    import triton

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"Triton {triton.__version__}; peft {peft_version() if have_peft else 'not installed (no column)'}",
        f"date: {date}",
        f"command: {command}",
        f"{args.tokens} tokens, bf16, dropout {args.dropout}, shrink {args.shrink}; fwd goal <= {GOAL_FWD}x "
        f"the base GEMM, f+b goal <= {GOAL_FWD_BWD}x the base layer's fwd+bwd",
    ]
    print("\n".join(header))
    names = ["torch", "peft", "minilora"] if have_peft else ["torch", "minilora"]
    hdr = "".join(f"{n:>9}" for n in names)
    print(
        f"\n{'model':<11} {'proj':<10} {'in->out':>12} {'r':>3} | {'base ms':>8}{hdr}  fwd<={GOAL_FWD} "
        f"| {'base ms':>8}{hdr}  f+b<={GOAL_FWD_BWD}"
    )
    met = dict(fwd=0, fwd_bwd=0, peft=0)
    results = []
    for model, proj, n_in, n_out, r in rows:
        fuse = {"auto": None, "in-loop": True, "separate": False}[args.shrink]
        t = bench_one(args.tokens, n_in, n_out, r, args.dropout, have_peft, fuse)
        results.append(((model, proj, n_in, n_out, r), t))
        cells, t["goals"] = [], []
        for i, goal in ((0, GOAL_FWD), (1, GOAL_FWD_BWD)):
            base = t["base"][i]
            ratios = {n: t[n][i] / base for n in names}
            ok = ratios["minilora"] <= goal
            t["goals"].append("ok" if ok else "MISS")
            met["fwd" if i == 0 else "fwd_bwd"] += ok
            if have_peft:
                met["peft"] += t["minilora"][i] < t["peft"][i]
            cells.append(
                f"{base:8.3f}"
                + "".join(f"{ratios[n]:8.3f}x" for n in names)
                + f"  {'ok' if ok else 'MISS':>9}"
            )
        check = f"  WRONG vs unfused: {', '.join(t['failures'])}" if t["failures"] else ""
        print(
            f"{model:<11} {proj:<10} {f'{n_in}->{n_out}':>12} {r:>3} | " + " | ".join(cells) + check,
            flush=True,
        )
        if args.markdown:  # after every shape: a run cut short still leaves its table
            write_summary(args, header, results, names, met, len(rows), have_peft, args.markdown)
    table, wrong = write_summary(args, header, results, names, met, len(rows), have_peft, args.markdown)
    print("\n---- summary for benchmarks/RESULTS.md ----\n" + table, flush=True)
    return 1 if wrong else 0


def write_summary(args, header, results, names, met, n_planned, have_peft, path) -> tuple[str, int]:
    """The Markdown table and goal counts so far; written to `path` if given. Returns (text, wrong)."""
    n = len(results)
    wrong = sum(bool(t["failures"]) for _, t in results)
    summary = [] if n == n_planned else [f"PARTIAL: {n} of {n_planned} shapes measured"]
    summary.append(
        f"forward <= {GOAL_FWD}x base GEMM: {met['fwd']}/{n}; "
        f"fwd+bwd <= {GOAL_FWD_BWD}x base fwd+bwd: {met['fwd_bwd']}/{n}"
    )
    if have_peft:
        summary.append(f"faster than peft: {met['peft']}/{2 * n} (fwd and fwd+bwd)")
    if args.dropout == 0:
        summary.append(f"output and gradients equal to the unfused PyTorch LoRA: {n - wrong}/{n} shapes")
    table = markdown_table(header, results, names) + "\n" + "\n".join(summary) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(table)
    return table, wrong


def peft_version() -> str:
    import peft

    return peft.__version__


if __name__ == "__main__":
    sys.exit(main())
