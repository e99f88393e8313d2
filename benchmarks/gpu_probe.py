"""The GPU probe: one command (<= 5 minutes) that answers what a GPU session must answer, in order:

    1. env       versions, GPU, SMs
    2. eta       the plain Triton GEMM (each tile config, no LoRA) vs cuBLAS at three Gemma shapes
    3. layer     LoRA layer time / base layer time (forward; forward+backward), L2 flushed, for the
                 Triton plan, the hybrid (cuBLAS GEMMs, Triton thin passes), the cuBLAS composite and
                 peft, after checking y, dx, dA, dB against a float32 reference; eagerly, then under
                 a CUDA graph (the GPU's time alone); the host time per call
    4. profile   torch.profiler of one forward+backward per contender at gemma-2-9b q
    5. dropout   p = 0.1 vs 0 at gemma-2-9b q;  decode: M in {1, 8, 64}
    6. quant     the 4-bit (NF4) LoRA layer's forward vs the bf16 base GEMM (and bitsandbytes + peft)
    7. compile   first-call compile + autotune times; registers and spills of every compiled kernel
    8. decision  the rule below, applied
    9. tests     the GPU-marked tests, if time remains

    python benchmarks/gpu_probe.py --out $OUT                     # on the GPU machine (no install)
    python benchmarks/gpu_probe.py --cpu-smoke --out /tmp/probe   # its logic on the CPU (interpreter)

It appends JSON lines to OUT/probe.jsonl and rewrites OUT/probe.md after each section, so a run cut
short keeps what it measured; sections past --deadline seconds are skipped and say so.
Decision rule: if the Triton plan's forward+backward is within 3 % of the best alternative (the
hybrid or the composite) at the big shapes (N >= 2048), keep it as the default ("auto" on CUDA);
else make the cuBLAS composite the default and keep Triton for the memory-bound part (the dropout mask).
Times: median of triton.testing.do_bench (L2 flushed before each run), bf16, 4096 tokens.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
KERNELS = None  # minilora.kernels.lora_linear, imported by importable_minilora()


def importable_minilora() -> str | None:
    """Import minilora without putting the repository root on sys.path (its top-level kernels/ would
    shadow the PyPI package `kernels` that transformers, and so peft, probe for): when minilora is not
    installed, a temporary folder holds a `minilora` of links to the package's files, with kernels/
    linked inside it as minilora/kernels. Returns that folder (for the tests' PYTHONPATH) or None."""
    global KERNELS
    root = ROOT
    sys.path[:] = [q for q in sys.path if Path(q or ".").resolve() != root]
    farm = None
    try:
        import minilora.kernels  # noqa: F401 - installed (pip install -e .)
    except ImportError:
        farm = Path(tempfile.mkdtemp())
        (farm / "minilora").mkdir()
        for f in (root / "minilora").iterdir():
            if f.name != "__pycache__":
                (farm / "minilora" / f.name).symlink_to(f)
        (farm / "minilora" / "kernels").symlink_to(root / "kernels")
        sys.path.insert(0, str(farm))
    KERNELS = importlib.import_module("minilora.kernels.lora_linear")  # the package's lora_linear is the op
    return None if farm is None else str(farm)


# (names, in, out) per model, from the models' config.json (hidden, heads * head_dim, intermediate)
SHAPES = {
    "gemma-2-9b": [("q", 3584, 4096), ("k/v", 3584, 2048), ("o", 4096, 3584), ("gate/up", 3584, 14336),
                   ("down", 14336, 3584)],
    "gemma-7b": [("q", 3072, 4096), ("gate/up", 3072, 24576)],
    "gemma-3-1b": [("q", 1152, 1024), ("k", 1152, 256)],
}  # fmt: skip
ETA_SHAPES = [
    ("gemma-2-9b", "q", 3584, 4096),
    ("gemma-2-9b", "down", 14336, 3584),
    ("gemma-3-1b", "q", 1152, 1024),
]
RANKS = (16, 64)
IMPLS = ("triton", "hybrid", "composite", "peft")
GOALS = {"big": (1.05, 1.10), "small": (1.15, 1.25)}  # forward / base GEMM, forward+backward / base layer
WITHIN = 1.03


class Probe:
    def __init__(self, args):
        self.args, self.t0, self.records = args, time.time(), []
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "probe.jsonl").write_text("")
        self.dev = "cpu" if args.cpu_smoke else "cuda"
        self.dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
        self.M = 80 if args.cpu_smoke else 4096

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.t0)

    def record(self, section: str, **fields) -> dict:
        rec = dict(section=section, t=round(time.time() - self.t0, 2), **fields)
        self.records.append(rec)
        with open(self.out / "probe.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        print(json.dumps(rec, default=str), flush=True)
        return rec

    def shape(self, n_in: int, n_out: int) -> tuple[int, int]:
        return (max(16, n_in // 64), max(16, n_out // 64)) if self.args.cpu_smoke else (n_in, n_out)

    def time(self, fn, graph=False) -> float:
        """Median milliseconds of fn (L2 flushed), or of replaying it as a CUDA graph."""
        if self.args.cpu_smoke:
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        from triton.testing import do_bench

        if not graph:
            return do_bench(fn, warmup=5, rep=25, return_mode="median")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return do_bench(g.replay, warmup=5, rep=25, return_mode="median")

    def host_us(self, fn, n=10) -> float:
        """Microseconds of host time per call to enqueue fn's work (the GPU runs behind): when it exceeds
        the GPU's time, eager timings measure the host, not the kernels."""
        n = 1 if self.args.cpu_smoke else n  # the interpreter: the logic, not a time
        fn()
        if self.dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        host = (time.perf_counter() - t) / n * 1e6
        if self.dev == "cuda":
            torch.cuda.synchronize()
        return host

    def inputs(self, n_in, n_out, r, M=None, seed=0):
        g = torch.Generator(self.dev).manual_seed(seed)
        rand = lambda *s, std=1.0, dt=self.dtype: (std * torch.randn(*s, device=self.dev, generator=g)).to(dt)
        M = M or self.M
        x = rand(M, n_in).requires_grad_()
        W = rand(n_out, n_in, std=n_in**-0.5)
        A = rand(r, n_in, std=n_in**-0.5, dt=torch.float32).requires_grad_()  # minilora's float32 adapters
        B = rand(n_out, r, std=0.02, dt=torch.float32).requires_grad_()
        return x, W, A, B, rand(M, n_out)


# ----------------------------------------------------------------------------------------------------
# The contenders: name -> (forward closure over x, W, A, B; the parameters it trains besides x)
# ----------------------------------------------------------------------------------------------------
def contenders(x, W, A, B, s, p, impls) -> dict:
    out = {}
    for impl in impls:
        if impl in ("triton", "hybrid", "composite"):
            fn = (lambda plan: lambda: KERNELS.lora_linear(x, W, None, A, B, s, p, p > 0, plan=plan))(impl)
            out[impl] = (fn, [A, B])
        elif impl == "peft":
            layer = peft_layer(W, A, B, s, p, x.dtype)
            if layer is not None:
                out["peft"] = ((lambda: layer(x)), [q for q in layer.parameters() if q.requires_grad])
        elif impl == "torch":  # the plain PyTorch LoRA (minilora's CPU path)
            lo = lambda: F.linear(F.linear(F.dropout(x, p, training=p > 0), A.to(x.dtype)), B.to(x.dtype))
            out["torch"] = ((lambda: F.linear(x, W) + s * lo()), [A, B])
    return out


def peft_layer(W, A, B, s, p, dtype):
    """peft's lora.Linear through get_peft_model, adapters cast to the activation dtype (bf16): the
    faster of peft's two forms (its default keeps float32 adapters and casts x up), so a conservative peer."""
    try:
        import peft
    except ImportError:
        return None
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    holder.proj.weight.data.copy_(W)
    cfg = peft.LoraConfig(r=A.shape[0], lora_alpha=s * A.shape[0], lora_dropout=p, target_modules=["proj"])
    layer = peft.get_peft_model(holder, cfg).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer.to(dtype).train(p > 0)


def check(fn, params, x, W, A, B, s, dy) -> dict:
    """Relative errors of y, dx, dA, dB against float32 on the same inputs (p = 0)."""
    y = fn()
    got = [y, *torch.autograd.grad(y, [x, *params], dy)]
    xf, Af, Bf = (t.detach().float().requires_grad_() for t in (x, A, B))
    ref = F.linear(xf, W.float()) + s * F.linear(F.linear(xf, Af), Bf)
    exp = [ref, *torch.autograd.grad(ref, [xf, Af, Bf], dy.float())]
    errs = {}
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, exp, strict=False):
        errs[name] = ((g.float().reshape(e.shape) - e).norm() / e.norm().clamp_min(1e-30)).item()
    return errs


def fwd_bwd(fn, inputs, dy):
    return lambda: torch.autograd.grad(fn(), inputs, dy)


def no_grad(fn):
    def run():
        with torch.no_grad():
            return fn()

    return run


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------
def section_env(pr: Probe):
    import triton

    info = dict(python=sys.version.split()[0], torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, date=datetime.date.today().isoformat(), argv=sys.argv)  # fmt: skip
    for name in ("peft", "transformers", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    except OSError:
        info["commit"] = None
    if pr.dev == "cuda":
        prop = torch.cuda.get_device_properties(0)
        info.update(
            gpu=prop.name, sms=prop.multi_processor_count, memory_gb=round(prop.total_memory / 2**30, 1)
        )
    else:
        info.update(gpu="cpu (Triton interpreter)", sms=None)
    pr.record("env", **info)


def section_eta(pr: Probe):
    configs = [(32, 32, 16, 1, 4)] if pr.args.cpu_smoke else KERNELS._MM_CONFIGS
    for model, proj, n_in, n_out in ETA_SHAPES[:1] if pr.args.cpu_smoke else ETA_SHAPES:
        n_in, n_out = pr.shape(n_in, n_out)
        x, W, *_ = pr.inputs(n_in, n_out, 16)
        x, wt = x.detach(), W.t()
        cublas = pr.time(lambda: F.linear(x, W))
        rows = []
        for c in configs:
            if pr.left() < 60:
                break
            t = pr.time(lambda c=c: KERNELS._matmul(x, wt, config=c))
            rows.append(dict(config=c, ms=t, eta=t / cublas))
        best = min(rows, key=lambda r: r["ms"]) if rows else None
        pr.record("eta", model=model, proj=proj, shape=[n_in, n_out], cublas_ms=cublas, configs=rows,
                  best=best["config"] if best else None, eta=best["eta"] if best else None)  # fmt: skip


def section_layer(pr: Probe):
    s = 2.0
    cases = [
        (m, proj, n_in, n_out, r)
        for m, shapes in SHAPES.items()
        for proj, n_in, n_out in shapes
        for r in RANKS
    ]
    if pr.args.cpu_smoke:
        cases = [c for c in cases if c[0] == "gemma-2-9b" and c[1] == "q" and c[4] == 16]
    for model, proj, n_in, n_out, r in cases:
        if pr.left() < 90:
            pr.record("layer", model=model, proj=proj, r=r, skipped="deadline")
            continue
        n_in, n_out = pr.shape(n_in, n_out)
        x, W, A, B, dy = pr.inputs(n_in, n_out, r)
        small = n_out < 2048 if not pr.args.cpu_smoke else n_out < 32
        graph = pr.dev == "cuda"  # the GPU's time alone, without the host's launch overhead
        base_f = lambda: F.linear(x, W)
        rec = dict(model=model, proj=proj, shape=[n_in, n_out], r=r, small=small)
        rec["base"] = dict(fwd=pr.time(no_grad(base_f)), fwdbwd=pr.time(fwd_bwd(base_f, [x], dy)))
        rec["base"]["host_us"] = pr.host_us(fwd_bwd(base_f, [x], dy))
        if graph:
            rec["base"].update(
                fwd_graph=pr.time(no_grad(base_f), graph=True),
                fwdbwd_graph=pr.time(fwd_bwd(base_f, [x], dy), graph=True),
            )
        ok = True
        for impl, (fn, params) in contenders(x, W, A, B, s, 0.0, IMPLS).items():
            t = time.time()
            errs = check(fn, params, x, W, A, B, s, dy)
            first = time.time() - t
            good = all(e < 2e-2 for e in errs.values())
            ok &= good
            res = dict(errors=errs, ok=good, first_call_s=round(first, 2))
            if good:
                res.update(fwd=pr.time(no_grad(fn)), fwdbwd=pr.time(fwd_bwd(fn, [x, *params], dy)))
                res["host_us"] = pr.host_us(fwd_bwd(fn, [x, *params], dy))
                if graph:
                    try:
                        res.update(
                            fwd_graph=pr.time(no_grad(fn), graph=True),
                            fwdbwd_graph=pr.time(fwd_bwd(fn, [x, *params], dy), graph=True),
                        )
                    except Exception as e:  # noqa: BLE001 - a probe reports, it does not stop
                        res["graph_error"] = repr(e)[:200]
                res["fwd_ratio"], res["fwdbwd_ratio"] = (
                    res["fwd"] / rec["base"]["fwd"],
                    res["fwdbwd"] / rec["base"]["fwdbwd"],
                )
            rec[impl] = res
        pr.record("layer", ok=ok, **rec)


def section_profile(pr: Probe):
    """torch.profiler of one forward+backward per contender at gemma-2-9b q (r = 16): where host and
    GPU time go (the top operators by self time)."""
    from torch.profiler import ProfilerActivity, profile

    n_in, n_out = pr.shape(3584, 4096)
    x, W, A, B, dy = pr.inputs(n_in, n_out, 16)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pr.dev == "cuda" else [])
    for impl, (fn, params) in contenders(x, W, A, B, 2.0, 0.0, IMPLS).items():
        step = fwd_bwd(fn, [x, *params], dy)
        warmup, steps = (1, 1) if pr.args.cpu_smoke else (3, 5)
        for _ in range(warmup):
            step()
        with profile(activities=acts) as prof:
            for _ in range(steps):
                step()
            if pr.dev == "cuda":
                torch.cuda.synchronize()
        events = prof.key_averages()
        attr = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
        gpu = lambda e: getattr(e, attr, 0) or 0
        row_ = lambda e, t: dict(op=e.key[:60], calls=e.count // 5, us=round(t / 5, 1))
        by_host = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        by_gpu = sorted(events, key=lambda e: -gpu(e))[:12]
        pr.record(
            "profile", impl=impl, host=[row_(e, e.self_cpu_time_total) for e in by_host],
            gpu=[row_(e, gpu(e)) for e in by_gpu if gpu(e) > 0],
            host_total_us=round(sum(e.self_cpu_time_total for e in events) / 5, 1),
            gpu_total_us=round(sum(gpu(e) for e in events) / 5, 1),
        )  # fmt: skip


def section_dropout_decode(pr: Probe):
    n_in, n_out = pr.shape(3584, 4096)
    x, W, A, B, dy = pr.inputs(n_in, n_out, 16)
    rec = {}
    for p in (0.0, 0.1):
        for impl, (fn, params) in contenders(x, W, A, B, 2.0, p, ("triton", "hybrid", "peft")).items():
            rec[f"{impl} p={p}"] = pr.time(fwd_bwd(fn, [x, *params], dy))
    pr.record("dropout", model="gemma-2-9b", proj="q", r=16, fwdbwd_ms=rec)
    for M in (8,) if pr.args.cpu_smoke else (1, 8, 64):
        x, W, A, B, _ = pr.inputs(n_in, n_out, 16, M=M)
        # minilora at M <= 64 takes its small-M path (cuBLAS GEMVs) whatever the plan
        named = {"triton": "minilora", "torch": "torch LoRA", "peft": "peft"}
        fns = {named[k]: f for k, (f, _) in contenders(x, W, A, B, 2.0, 0.0, tuple(named)).items()}
        fns["base"] = lambda: F.linear(x, W)
        times = {k: pr.time(no_grad(f), graph=pr.dev == "cuda") for k, f in fns.items()}
        pr.record("decode", M=M, model="gemma-2-9b", proj="q", r=16, fwd_graph_ms=times)


def bnb_peft_4bit(W, A, B, s):
    """bitsandbytes' NF4 Linear4bit (double quantization, bf16 compute) with peft's LoRA on it, or None."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError:
        return None
    holder = torch.nn.Module()
    holder.proj = bnb.nn.Linear4bit(
        W.shape[1], W.shape[0], bias=False, compute_dtype=W.dtype, quant_type="nf4"
    )
    holder.proj.weight = bnb.nn.Params4bit(
        W.cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    holder = holder.to(W.device)  # quantizes on the way to the GPU
    cfg = peft.LoraConfig(r=A.shape[0], lora_alpha=s * A.shape[0], target_modules=["proj"])
    layer = peft.get_peft_model(holder, cfg).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


def section_quant(pr: Probe):
    """Issue 10: the 4-bit (NF4, double-quantized) LoRA layer's forward at gemma-2-9b shapes vs the bf16
    base GEMM (goal <= 1.3x) and vs bitsandbytes + peft; its forward+backward; the dequantization pass."""
    try:
        import minilora
        from minilora.quant import Linear4bit
    except ImportError:
        pr.record("quant", skipped="minilora.quant not present")
        return
    s, r = 2.0, 16
    shapes = [("q", 3584, 4096), ("gate/up", 3584, 14336), ("down", 14336, 3584)]
    for proj, n_in, n_out in shapes[:1] if pr.args.cpu_smoke else shapes:
        if pr.left() < 60:
            pr.record("quant", proj=proj, skipped="deadline")
            continue
        n_in, n_out = pr.shape(n_in, n_out)
        x, W, A, B, dy = pr.inputs(n_in, n_out, r)
        q4 = Linear4bit.from_linear(W, "nf4")
        layer = minilora.LoRALinear(q4, r=r, alpha=s * r)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        W4 = q4.dequantize(x.dtype)
        xf = x.detach().float()
        ref = F.linear(xf, W4.float()) + s * F.linear(F.linear(xf, A), B)
        with torch.no_grad():
            err = ((layer(x).float() - ref).norm() / ref.norm()).item()
        fns = dict(
            base_bf16=lambda: F.linear(x, W), dequant=lambda: q4.dequantize(x.dtype), base_4bit=lambda: q4(x)
        )
        fns["lora_4bit"] = lambda: layer(x)
        peer = bnb_peft_4bit(W, A, B, s) if pr.dev == "cuda" else None
        if peer is not None:
            fns["bnb_peft_4bit"] = lambda: peer(x)
        grads = dict(base_bf16=[x], lora_4bit=[x, layer.lora_A, layer.lora_B])
        if peer is not None:
            grads["bnb_peft_4bit"] = [x, *(q for q in peer.parameters() if q.requires_grad)]
        rec = dict(proj=proj, shape=[n_in, n_out], r=r, error=err, ok=err < 2e-2, ms={}, graph_ms={})
        for name, fn in fns.items():  # eager (host-bound where the host is slow), then the GPU alone
            rec["ms"][name] = pr.time(no_grad(fn))
            rec["graph_ms"][name] = pr.time(no_grad(fn), graph=pr.dev == "cuda")
            if name in grads:
                rec["ms"][name + "_fwdbwd"] = pr.time(fwd_bwd(fn, grads[name], dy))
        for key in ("ms", "graph_ms"):
            ms = rec[key]
            rec[key + "_lora_vs_bf16_base"] = ms["lora_4bit"] / ms["base_bf16"]
            if "bnb_peft_4bit" in ms:
                rec[key + "_speedup_vs_bnb_peft"] = ms["bnb_peft_4bit"] / ms["lora_4bit"]
        rec["dequant_GBps"] = W.numel() * 2.5 / (rec["graph_ms"]["dequant"] * 1e6)  # 0.5 B read + 2 B written
        pr.record("quant", **rec)


def section_compile(pr: Probe):
    """Registers and spills of every kernel variant compiled in this run (Triton's JIT caches)."""
    firsts = [
        dict(model=r["model"], proj=r["proj"], r=r["r"], **{i: r[i]["first_call_s"] for i in IMPLS if i in r})
        for r in pr.records if r["section"] == "layer" and "base" in r
    ]  # fmt: skip
    kernels = []
    for name in ("_mm_kernel", "_shrink_kernel", "_dy_kernel", "_bits_kernel"):
        fn = getattr(KERNELS, name)
        for caches in getattr(fn, "device_caches", {}).values():
            for k in caches[0].values() if isinstance(caches, tuple) else []:
                try:
                    k._init_handles()
                    names = fn.arg_names
                    consts = {
                        names[i[0]] if isinstance(i, tuple) else i: v for i, v in k.src.constants.items()
                    }
                    keep = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "R_PAD", "LORA", "KEEP", "MASK")
                    kernels.append(dict(kernel=name, regs=k.n_regs, spills=k.n_spills, shared=k.metadata.shared,
                                        warps=k.metadata.num_warps, stages=k.metadata.num_stages,
                                        **{c: consts.get(c) for c in keep if c in consts}))  # fmt: skip
                except Exception as e:  # noqa: BLE001
                    kernels.append(dict(kernel=name, error=repr(e)[:200]))
    pr.record("compile", first_call_s=firsts, kernels=kernels)


def decide(pr: Probe) -> dict:
    """The decision rule on the GPU's own time (CUDA-graph replays where measured: eager timings at these
    sizes are bound by the host's launch overhead, see host_us), forward+backward at the big shapes."""
    big = [r for r in pr.records if r["section"] == "layer" and "base" in r and not r["small"]]
    key = "fwdbwd_graph" if any("fwdbwd_graph" in r["base"] for r in big) else "fwdbwd"
    ratios = []
    for r in big:
        alts = [r[i][key] for i in ("hybrid", "composite") if r.get(i, {}).get(key)]
        if r.get("triton", {}).get(key) and alts:
            ratios.append(r["triton"][key] / min(alts))
    if not ratios:
        return pr.record("decision", default=None, reason="no big-shape measurements")
    gmean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    default = "triton" if gmean <= WITHIN else "composite"
    reason = (f"Triton fwd+bwd ({key}) / best alternative at the big shapes: geometric mean {gmean:.3f}, "
              f"max {max(ratios):.3f} over {len(ratios)} cases; rule: <= {WITHIN} keeps Triton")  # fmt: skip
    return pr.record("decision", default=default, gmean=gmean, max=max(ratios), reason=reason)


def section_tests(pr: Probe):
    if pr.args.cpu_smoke or pr.left() < 45:
        pr.record("tests", skipped="cpu smoke" if pr.args.cpu_smoke else "deadline")
        return
    tests = ["tests/test_quant.py", "tests/test_kernels.py"]
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *tests]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [pr.farm, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=max(30, pr.left() - 10), cwd=ROOT, env=env
        )
        pr.record("tests", rc=proc.returncode, tail=proc.stdout[-1500:] + proc.stderr[-500:])
    except subprocess.TimeoutExpired:
        pr.record("tests", rc=None, tail="timed out")


# ----------------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------------
def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def ratio_cell(m: dict | None, fwd: str = "fwd", fwdbwd: str = "fwdbwd", base: dict | None = None) -> str:
    """'fwd / fwd+bwd' ratios of contender m to the base layer."""
    if not m or fwd not in m or base is None:
        return "-"
    return f"{m[fwd] / base[fwd]:.3f} / {m[fwdbwd] / base[fwdbwd]:.3f}"


def markdown(pr: Probe) -> str:
    recs = pr.records
    env = next((r for r in recs if r["section"] == "env"), {})
    versions = ", ".join(f"{k} {env.get(k)}" for k in ("torch", "triton", "peft", "bitsandbytes"))
    lines = [
        f"GPU probe: {env.get('gpu')}, {env.get('sms')} SMs, {versions}; {env.get('date')}, commit {env.get('commit')}"
    ]
    eta = [r for r in recs if r["section"] == "eta" and r.get("eta")]
    if eta:
        lines += [
            "",
            "## eta: best plain Triton GEMM / cuBLAS",
            "",
            row("shape", "cuBLAS ms", "best config", "eta"),
        ]
        lines += [row("---", "---", "---", "---")]
        for r in eta:
            shape = f"{r['model']} {r['proj']} {r['shape'][0]}->{r['shape'][1]}"
            lines.append(row(shape, f"{r['cublas_ms']:.3f}", r["best"], f"{r['eta']:.3f}"))
    layer = [r for r in recs if r["section"] == "layer" and "base" in r]
    tables = [
        ("eager (host and GPU)", "fwd", "fwdbwd"),
        ("under a CUDA graph (the GPU alone)", "fwd_graph", "fwdbwd_graph"),
    ]
    for title, fwd, fwdbwd in tables:
        rows = [r for r in layer if fwd in r["base"]]
        if not rows:
            continue
        head = (
            "model",
            "proj",
            "in->out",
            "r",
            "base fwd ms",
            "base f+b ms",
            *IMPLS,
            "goal fwd, f+b",
            "check",
        )
        lines += ["", f"## layer, {title}: LoRA layer / base layer, fwd / fwd+bwd (bf16, 4096 tokens)", ""]
        lines += [row(*head), row(*["---"] * len(head))]
        for r in rows:
            goal = GOALS["small" if r["small"] else "big"]
            bad = [f"{i} {r[i]['errors']}" for i in IMPLS if i in r and not r[i]["ok"]]
            cells = [ratio_cell(r.get(i), fwd, fwdbwd, r["base"]) for i in IMPLS]
            shape, base = f"{r['shape'][0]}->{r['shape'][1]}", r["base"]
            times = (f"{base[fwd]:.3f}", f"{base[fwdbwd]:.3f}")
            lines.append(
                row(
                    r["model"],
                    r["proj"],
                    shape,
                    r["r"],
                    *times,
                    *cells,
                    "{}, {}".format(*goal),
                    "; ".join(bad) or "ok",
                )
            )
    if any("host_us" in r["base"] for r in layer):
        lines += ["", "Host time to enqueue one eager fwd+bwd (us): " + "; ".join(
            f"{r['model']} {r['proj']} r={r['r']}: base {r['base']['host_us']:.0f}, "
            + ", ".join(f"{i} {r[i]['host_us']:.0f}" for i in IMPLS if "host_us" in r.get(i, {}))
            for r in layer if "host_us" in r["base"])]  # fmt: skip
    for r in (r for r in recs if r["section"] == "profile"):
        lines += ["", f"## profile: {r['impl']}, gemma-2-9b q r=16, one fwd+bwd: host {r['host_total_us']} us, "
                  f"GPU {r['gpu_total_us']} us", ""]  # fmt: skip
        lines += ["- host: " + ", ".join(f"{e['op']} x{e['calls']} {e['us']}" for e in r["host"])]
        lines += ["- GPU: " + ", ".join(f"{e['op']} x{e['calls']} {e['us']}" for e in r["gpu"])]
    for sec in ("dropout", "decode", "quant", "compile", "tests"):
        for r in (r for r in recs if r["section"] == sec):
            body = {k: v for k, v in r.items() if k not in ("section", "t", "kernels")}
            lines += ["", f"## {sec}", "", "```", json.dumps(body, default=str)[:3000], "```"]
            keys = (
                "kernel",
                "BLOCK_M",
                "BLOCK_N",
                "BLOCK_K",
                "R_PAD",
                "LORA",
                "KEEP",
                "MASK",
                "warps",
                "regs",
                "spills",
            )
            if r.get("kernels"):
                lines += ["", row(*keys), row(*["---"] * len(keys))]
                lines += [row(*(k.get(c, "") for c in keys)) for k in r["kernels"] if "error" not in k]
    dec = next((r for r in recs if r["section"] == "decision"), None)
    verdict = f"default on CUDA: **{dec['default']}**: {dec['reason']}" if dec else "not reached"
    return "\n".join([*lines, "", "## Decision", "", verdict]) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for probe.jsonl and probe.md")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU, Triton interpreter")
    p.add_argument("--deadline", type=float, default=270.0, help="seconds; later sections are skipped")
    p.add_argument("--skip", nargs="*", default=[], help="sections to leave out (eta, layer, profile, ...)")
    args = p.parse_args(argv)
    if args.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--cpu-smoke needs TRITON_INTERPRET=1 in the environment (set before Triton is imported)")
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU: use --cpu-smoke to check the probe's logic")
    pr = Probe(args)
    pr.farm = importable_minilora()
    sections = [
        section_env,
        section_eta,
        section_layer,
        section_profile,
        section_dropout_decode,
        section_quant,
    ]
    sections = [f for f in sections if f.__name__.removeprefix("section_") not in args.skip] + [
        section_compile
    ]
    for section in sections:
        try:
            section(pr)
        except Exception as e:  # noqa: BLE001 - record and go on: the next sections still answer
            import traceback

            pr.record(
                section.__name__.removeprefix("section_"),
                error=repr(e)[:300],
                trace=traceback.format_exc()[-1500:],
            )
        (pr.out / "probe.md").write_text(markdown(pr))
    decide(pr)
    (pr.out / "probe.md").write_text(markdown(pr))
    section_tests(pr)
    (pr.out / "probe.md").write_text(markdown(pr))
    print(markdown(pr))
    return 0


if __name__ == "__main__":
    sys.exit(main())
