"""One LoRA SFT step on the real Gemma 3 270M: minilora against transformers + peft.

    python benchmarks/bench_train_step.py [--repeats 5] [--peft-bf16 auto|run|skip] [--quantize nf4]

The step: a batch of 4 x 128 tokens whose last quarter carries labels (three quarters of each
sequence prompt-masked), LoRA r=8 / alpha 16 on q,k,v,o, forward + backward + AdamW. Every side
loads the same weights (minilora.gguf.default_model_dir()) and gets the same batch. The sides:
- minilora in its default: dtype="auto" (bf16 base weights under bf16 autocast where the CPU has
  fast bf16, float32 elsewhere: minilora.cpu); float32 adapters and AdamW state either way;
- transformers + peft in its default, float32;
- transformers + peft in bf16 (the model loaded in bfloat16; peft keeps its adapters float32). On a
  CPU without fast bf16 (AVX2 only) its matmuls run ~300x slower than float32, a step takes hours:
  --peft-bf16 auto (the default) runs it only where minilora.cpu.fast_bf16() says bf16 is fast, and
  the report says when it was skipped; --peft-bf16 run forces it.
The first lines name the CPU (model name, the flags that decide bf16's speed, torch's vector level).

Method. Each side lives in its own process (so each has its own peak memory); the parent asks them
for one step at a time, alternating the sides, and reports the median step time of each, and the
median CPU time of a step (the process's user + system seconds: steadier than wall time when other
jobs share the machine, and equal to it times the threads when they all stay busy).
Peak memory: after loading and building the adapter, each child resets its kernel high-water mark
(writing "5" to /proc/self/clear_refs resets VmHWM) and reads VmHWM after its last step: the peak
resident memory of the steps themselves, weights included. The loading peak, read before the
reset, is printed too (on Linux ru_maxrss is that same counter, so it cannot give a whole-process
peak after the reset). Step-0 losses must agree (B = 0 at init on every side, so each computes the
base model's loss): to 1e-4 relative between float32 sides, to 2e-2 where one side runs bf16 (8
significant bits; measured ~1e-3 on the 270M).

transformers + peft computes logits at all 512 positions; minilora's Gemma runs its output head
only at the 128 positions that carry a label, which is where most of its lead comes from.

--quantize nf4 (QLoRA): three sides, steps interleaved: minilora's 4-bit step
(from_pretrained(quantize="nf4")), transformers + peft + bitsandbytes' 4-bit step (load_in_4bit, NF4
with double quantization, float32 compute: bit for bit the same 4-bit tensors), and minilora's float32
step. The two 4-bit step-0 losses are checked to 1e-2 relative only: bitsandbytes' CPU forward differs
from the dequantized weights' product by ~1e-2 per layer (DESIGN.md §8).
"""

import argparse
import statistics
import time

B, T, LABELED = 4, 128, 32  # labels on the last 32 of 128 tokens: three quarters masked


def batch():
    import torch

    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 200_000, (B, T), generator=g)  # (B, T), no special ids
    labels = torch.full((B, T), -100)
    labels[:, T - LABELED :] = input_ids[:, T - LABELED :]
    return input_ids, labels


def status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmHWM: the peak resident memory, VmRSS: now) in MB."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def vm_hwm_mb() -> float:
    return status_mb("VmHWM")


def vm_rss_mb() -> float:
    return status_mb("VmRSS")


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def cpu_report() -> str:
    """The CPU's model name, the flags that decide bf16's speed, torch's vector level and threads."""
    import torch

    info = {}
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
    flags = [x for x in wanted if x in info.get("flags", "").split()]
    return (f"CPU: {info.get('model name', '?')}; flags {' '.join(flags) or 'none of ' + str(wanted)}; "
            f"torch {torch.__version__}, vector level {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def build(side: str):
    """(model, loss function, autocast dtype or None) of a side."""
    import torch

    from minilora.gguf import default_model_dir

    path, (input_ids, labels) = default_model_dir(), batch()
    if side.startswith("minilora"):
        import minilora
        from minilora.checkpoint import resolve_dtype
        from minilora.gemma import from_pretrained

        dtype = torch.float32 if "nf4" in side or side == "minilora-fp32" else resolve_dtype("auto", "cpu")
        model = from_pretrained(path, dtype=dtype, quantize="nf4" if "nf4" in side else None)
        minilora.inject(model, minilora.LoRAConfig(r=8, alpha=16, targets=TARGETS))
        return model, lambda: model(input_ids, labels=labels), None if dtype == torch.float32 else dtype
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    kw = dict(quantization_config=nf4, device_map="cpu") if "nf4" in side else {}
    dtype = torch.bfloat16 if side == "peft-bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    return model, lambda: model(input_ids=input_ids, labels=labels).loss, None


def child(side: str, conn) -> None:
    import torch

    model, loss_fn, autocast = build(side)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    load_peak = vm_hwm_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: from here on, the steps' peak
        f.write("5")
    dtype = str(autocast or next(p for p in model.parameters() if not p.requires_grad).dtype)
    conn.send((load_peak, sum(p.numel() for p in params), dtype.removeprefix("torch."), cpu_report()))
    while conn.recv() == "step":
        t, cpu = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = loss_fn()
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        conn.send((loss.item(), time.perf_counter() - t, time.process_time() - cpu))
    conn.send(vm_hwm_mb())


def sides_to_run(args) -> tuple[tuple[str, ...], str | None]:
    """The sides of this run (minilora first, its reference second) and why peft-bf16 is left out."""
    if args.quantize:
        return ("minilora-nf4", "peft-nf4", "minilora-fp32"), None
    from minilora.cpu import fast_bf16

    fast, why = fast_bf16()
    if args.peft_bf16 == "run" or (args.peft_bf16 == "auto" and fast):
        return ("minilora", "peft", "peft-bf16"), None
    if args.peft_bf16 == "skip":
        return ("minilora", "peft"), "--peft-bf16 skip"
    return ("minilora", "peft"), f"this CPU has no fast bf16 ({why}); --peft-bf16 run forces it"


def start(sides):
    """One process per side, loaded one after another (loading is not what is measured)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    conns, procs, dtypes = {}, {}, {}
    for side in sides:
        parent, child_end = ctx.Pipe()
        procs[side] = ctx.Process(target=child, args=(side, child_end))
        procs[side].start()
        load_peak, n_params, dtypes[side], cpu = parent.recv()
        if len(conns) == 0:
            print(cpu)
        conns[side] = parent
        print(f"{side:13s} ready ({dtypes[side]}): {n_params:,} trainable parameters; "
              f"peak RSS while loading {load_peak:.0f} MB")  # fmt: skip
    return conns, procs, dtypes


def measure(sides, repeats: int):
    """(losses, step times, CPU times, peak RSS) per side, the steps alternating side by side."""
    conns, procs, dtypes = start(sides)
    losses, times, cpus = ({s: [] for s in sides} for _ in range(3))
    for _ in range(repeats + 1):
        for side in sides:
            conns[side].send("step")
            loss, dt, cpu = conns[side].recv()
            losses[side].append(loss)
            times[side].append(dt)
            cpus[side].append(cpu)
    peaks = {}
    for side in sides:
        conns[side].send("stop")
        peaks[side] = conns[side].recv()
        procs[side].join()
    return losses, times, cpus, peaks, dtypes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (after one warm-up step)")
    p.add_argument("--peft-bf16", choices=["auto", "run", "skip"], default="auto",
                   help="transformers + peft in bf16: auto = only where this CPU has fast bf16")  # fmt: skip
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: the 4-bit steps (see above)")
    args = p.parse_args()
    from minilora.gguf import default_model_dir

    default_model_dir()  # convert once, before the children race for it
    sides, skipped = sides_to_run(args)
    losses, times, cpus, peaks, dtypes = measure(sides, args.repeats)
    report(sides, losses, times, cpus, peaks, dtypes, args)
    if skipped:
        print(f"peft-bf16 not run: {skipped}")


def report(sides, losses, times, cpus, peaks, dtypes, args) -> None:
    ours = sides[0]
    for other in sides[1:]:
        m, q = losses[ours][0], losses[other][0]
        if other == "minilora-fp32":  # another model (float32 weights): its loss is not checked
            print(f"step-0 loss of the float32 weights: {q:.6f} (4-bit: {m:.6f})")
            continue
        bf16 = "bfloat16" in (dtypes[ours], dtypes[other])
        tolerance = 1e-2 if args.quantize else 2e-2 if bf16 else 1e-4
        print(f"step-0 loss: {ours} {m:.6f}  {other} {q:.6f}  (rel. diff {abs(m - q) / abs(q):.1e}, "
              f"tolerance {tolerance:g})")  # fmt: skip
        assert abs(m - q) <= tolerance * abs(q), f"step-0 losses of {ours} and {other} differ"
    med = {s: statistics.median(times[s][1:]) for s in sides}  # step 0 is the warm-up
    cpu = {s: statistics.median(cpus[s][1:]) for s in sides}
    for s in sides:
        steps = " ".join(f"{t:.2f}" for t in times[s][1:])
        print(f"{s:13s} {dtypes[s]:8s} step {med[s]:6.2f} s (median of {args.repeats}: {steps}), "
              f"CPU time {cpu[s]:6.2f} s, peak RSS in steps {peaks[s]:6.0f} MB")  # fmt: skip
    for other in sides[1:]:
        memory = peaks[ours] / peaks[other]
        print(f"{other} / {ours}: step time {med[other] / med[ours]:.2f}x (CPU time "
              f"{cpu[other] / cpu[ours]:.2f}x); peak memory {ours} / {other} {memory:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
