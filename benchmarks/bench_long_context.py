"""One LoRA training step on long sequences, every token labelled: minilora against transformers + peft.

    python benchmarks/bench_long_context.py [--lengths 512 1024 2048 4096 8192] [--limit-gb 18]

The step: the real Gemma 3 270M, float32, batch 1 x T random tokens all labelled (plain text, as in
continued pre-training), LoRA r=8 / alpha 16 on q,k,v,o, gradient checkpointing on both sides
(transformers' non-reentrant one), forward + backward + AdamW. Here the output head's lead of
prompt-masked batches (bench_train_step.py) is gone: what is left is how little of the
(T, 262,144) logits and of the (T, T) attention each side holds.

Method. Every (side, T) runs in a fresh process, one at a time, the two sides interleaved (T by T).
A process loads and injects, resets its kernel high-water mark (writing "5" to
/proc/self/clear_refs resets VmHWM), runs one step and reports VmHWM minus its resident memory
before the step: the extra peak memory of the step over the loaded model, and bytes per token.
Each process runs under an address-space limit (RLIMIT_AS, --limit-gb, lowered to what the
machine has available), so a side that needs more fails with an allocation error, reported as
OOM, instead of taking the machine down. Step-0 losses must agree (LoRA's B = 0 at init: both
compute the base model's loss).
"""

import argparse
import multiprocessing as mp
import os
import resource
import time

from bench_train_step import vm_hwm_mb, vm_rss_mb

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def meminfo_gb(field: str = "MemAvailable") -> float:
    with open("/proc/meminfo") as f:
        return int(next(x for x in f if x.startswith(field + ":")).split()[1]) / 2**20


def load(side: str, path: str):
    """The model with its adapter and gradient checkpointing, and a loss function of the ids."""
    import torch

    if side == "minilora":
        import minilora
        from minilora.gemma import from_pretrained

        model = from_pretrained(path, dtype=torch.float32)
        minilora.inject(model, minilora.LoRAConfig(r=8, alpha=16, targets=TARGETS))
        model.gradient_checkpointing = True
        return model, lambda ids: model(ids, labels=ids)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    return model, lambda ids: model(input_ids=ids, labels=ids).loss


def child(side: str, T: int, limit_gb: float, path: str, conn) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30),) * 2)
    try:
        import torch

        model, loss_fn = load(side, path)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(10, 200_000, (1, T), generator=torch.Generator().manual_seed(T))  # (1, T)
        loaded = vm_rss_mb()
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: from here on, the step's peak
            f.write("5")
        t = time.perf_counter()
        loss = loss_fn(ids)
        loss.backward()
        opt.step()
        seconds = time.perf_counter() - t
        conn.send(dict(loss=loss.item(), seconds=seconds, extra_mb=vm_hwm_mb() - loaded))
    except (MemoryError, RuntimeError) as e:  # torch's "DefaultCPUAllocator: can't allocate memory"
        if "alloc" not in str(e) and not isinstance(e, MemoryError):
            raise
        conn.send(dict(oom=f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"))


def run(side: str, T: int, limit_gb: float, path: str) -> dict:
    limit = min(limit_gb, meminfo_gb() - 1.0)  # never more than the machine has free now
    parent, end = mp.get_context("spawn").Pipe()
    proc = mp.get_context("spawn").Process(target=child, args=(side, T, limit, path, end))
    proc.start()
    end.close()
    try:
        out = parent.recv()
    except EOFError:  # killed without a word (the kernel's OOM killer): OOM too
        out = dict(oom=f"process died (exit code {proc.exitcode})")
    proc.join()
    return out | dict(limit_gb=limit)


def cell(r: dict, T: int) -> str:
    if "oom" in r:
        return f"OOM under {r['limit_gb']:.1f} GB ({r['oom']})"
    mb = r["extra_mb"]
    return f"+{mb / 1024:.2f} GB ({mb * 2**20 / T / 1e3:.0f} kB/token), {r['seconds']:.0f} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--limit-gb", type=float, default=18.0, help="address-space limit of each process")
    p.add_argument("--sides", nargs="+", default=["minilora", "peft"])
    args = p.parse_args()
    from minilora.gguf import default_model_dir

    path = str(default_model_dir())  # convert once, before the children race for it
    print("| T | minilora: extra peak (per token), step | transformers + peft | memory | time | load |")
    print("| --- | --- | --- | --- | --- | --- |")
    for T in args.lengths:
        load_before = os.getloadavg()[0]
        r = {side: run(side, T, args.limit_gb, path) for side in args.sides}
        m, q = r.get("minilora", {}), r.get("peft", {})
        mem = f"{q['extra_mb'] / m['extra_mb']:.1f}x less" if "extra_mb" in m and "extra_mb" in q else ""
        speed = f"{m['seconds'] / q['seconds']:.2f}x the time" if "seconds" in m and "seconds" in q else ""
        if "loss" in m and "loss" in q:
            assert abs(m["loss"] - q["loss"]) <= 1e-4 * abs(q["loss"]), f"step-0 losses differ: {m} {q}"
        cells = [cell(r[s], T) if s in r else "" for s in ("minilora", "peft")]
        load = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"  # 1-minute load average before/after
        print(f"| {T} | {cells[0]} | {cells[1]} | {mem} | {speed} | {load} |", flush=True)


if __name__ == "__main__":
    main()
