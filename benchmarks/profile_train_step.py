"""Where one LoRA SFT step's time goes: torch.profiler's top operators, on the real Gemma 3 270M.

    python benchmarks/profile_train_step.py [--dtype auto] [--compile] [--top 25]

The step is bench_train_step.py's (4 x 128 tokens, the last 32 of each labelled, r=8 / alpha 16 on
q,k,v,o, forward + backward + AdamW). Two warm-up steps, then one profiled step; the table is sorted
by self CPU time (the time an operator spends in its own code, not in the operators it calls), so
the matmuls (aten::mm, aten::addmm, aten::bmm) and everything else stand side by side. The last
line is the share of the step the matmuls take: the rest is what fusion and fewer casts can win.
"""

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import minilora
from minilora.checkpoint import from_pretrained, resolve_dtype
from minilora.gguf import default_model_dir

B, T, LABELED = 4, 128, 32
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_mkldnn")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="auto", help="base weights: auto, float32, bfloat16")
    p.add_argument("--compile", action="store_true", help="gemma.compile_norms: fused RMSNorms")
    p.add_argument("--top", type=int, default=25, help="operators to list")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    model = from_pretrained(default_model_dir(), dtype=dtype)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    minilora.inject(model, minilora.LoRAConfig(r=8, alpha=16, targets=targets))
    if args.compile:
        print(f"compiled {minilora.gemma.compile_norms(model)} RMSNorms (the first step compiles them)")
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 200_000, (B, T), generator=g)  # (B, T)
    labels = torch.full((B, T), -100)
    labels[:, T - LABELED :] = input_ids[:, T - LABELED :]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model(input_ids, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for i in range(2):
        t = time.perf_counter()
        loss = step()
        print(f"warm-up step {i}: {time.perf_counter() - t:.2f} s, loss {loss:.4f}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMULS))
    share = 100 * mm / total
    print(
        f"dtype {dtype}, compile {args.compile}, {torch.get_num_threads()} threads: profiled step "
        f"{wall:.2f} s; matmuls {share:.0f}% of the self CPU time, the rest {100 - share:.0f}%"
    )


if __name__ == "__main__":
    main()
