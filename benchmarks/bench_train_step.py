"""One LoRA SFT step on the real Gemma 3 270M: minilora against transformers + peft.

    python benchmarks/bench_train_step.py [--repeats 5] [--quantize nf4]

The step: a batch of 4 x 128 tokens whose last quarter carries labels (three quarters of each
sequence prompt-masked), LoRA r=8 / alpha 16 on q,k,v,o, float32, forward + backward + AdamW.
Both sides load the same weights (minilora.gguf.default_model_dir()) and get the same batch.

Method. Each side lives in its own process (so each has its own peak memory); the parent asks them
for one step at a time, alternating minilora / peft, and reports the median step time of each, and
the median CPU time of a step (the process's user + system seconds: steadier than wall time when
other jobs share the machine, and equal to it times the threads when they all stay busy).
Peak memory: after loading and building the adapter, each child resets its kernel high-water mark
(writing "5" to /proc/self/clear_refs resets VmHWM) and reads VmHWM after its last step: the peak
resident memory of the steps themselves, weights included. The loading peak, read before the
reset, is printed too (on Linux ru_maxrss is that same counter, so it cannot give a whole-process
peak after the reset). Step-0 losses must agree (B = 0 at init on both sides, so both compute the
base model's loss): checked to 1e-4 relative.

transformers + peft computes logits at all 512 positions; minilora's Gemma runs its output head
only at the 128 positions that carry a label, which is where most of its lead comes from.

--quantize nf4 (QLoRA): three sides, steps interleaved: minilora's 4-bit step
(from_pretrained(quantize="nf4")), transformers + peft + bitsandbytes' 4-bit step (load_in_4bit, NF4
with double quantization, float32 compute: bit for bit the same 4-bit tensors), and minilora's float32
step. The two 4-bit step-0 losses are checked to 1e-2 relative only: bitsandbytes' CPU forward differs
from the dequantized weights' product by ~1e-2 per layer (DESIGN.md §8).
"""

import argparse
import multiprocessing as mp
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


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def child(side: str, conn) -> None:
    import torch

    from minilora.gguf import default_model_dir

    path = default_model_dir()
    input_ids, labels = batch()
    if side.startswith("minilora"):
        import minilora
        from minilora.gemma import from_pretrained

        model = from_pretrained(path, dtype=torch.float32, quantize="nf4" if "nf4" in side else None)
        minilora.inject(
            model, minilora.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        loss_fn = lambda: model(input_ids, labels=labels)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        kw = dict(quantization_config=nf4, device_map="cpu") if "nf4" in side else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
        model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        loss_fn = lambda: model(input_ids=input_ids, labels=labels).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    load_peak = vm_hwm_mb()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: from here on, the steps' peak
        f.write("5")
    conn.send((load_peak, sum(p.numel() for p in params)))
    while conn.recv() == "step":
        t, cpu = time.perf_counter(), time.process_time()
        loss = loss_fn()
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        conn.send((loss.item(), time.perf_counter() - t, time.process_time() - cpu))
    conn.send(vm_hwm_mb())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (after one warm-up step)")
    p.add_argument("--quantize", choices=["nf4"], default=None, help="QLoRA: the 4-bit steps (see above)")
    args = p.parse_args()
    from minilora.gguf import default_model_dir

    default_model_dir()  # convert once, before the children race for it
    ctx = mp.get_context("spawn")
    sides = ("minilora-nf4", "peft-nf4", "minilora") if args.quantize else ("minilora", "peft")
    conns, procs = {}, {}
    for side in sides:  # load one at a time: loading is not what is measured
        parent, child_end = ctx.Pipe()
        procs[side] = ctx.Process(target=child, args=(side, child_end))
        procs[side].start()
        load_peak, n_params = parent.recv()
        conns[side] = parent
        print(
            f"{side:12s} ready: {n_params:,} trainable parameters; peak RSS while loading {load_peak:.0f} MB"
        )
    losses, times, cpus = {s: [] for s in sides}, {s: [] for s in sides}, {s: [] for s in sides}
    for _ in range(args.repeats + 1):  # alternate the sides step by step
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

    ours, theirs = sides[:2]
    m, q = losses[ours][0], losses[theirs][0]
    print(f"step-0 loss: {ours} {m:.6f}  {theirs} {q:.6f}  (rel. diff {abs(m - q) / abs(q):.1e})")
    tolerance = 1e-2 if args.quantize else 1e-4
    assert abs(m - q) <= tolerance * abs(q), (
        "step-0 losses differ: the two sides do not compute the same model"
    )
    med = {s: statistics.median(times[s][1:]) for s in sides}  # step 0 is the warm-up
    cpu = {s: statistics.median(cpus[s][1:]) for s in sides}
    for s in sides:
        steps = " ".join(f"{t:.2f}" for t in times[s][1:])
        print(f"{s:12s} step {med[s]:6.2f} s (median of {args.repeats}: {steps}), CPU time {cpu[s]:6.2f} s, "
              f"peak RSS in steps {peaks[s]:6.0f} MB")  # fmt: skip
    print(f"speed-up ({theirs} time / {ours} time): {med[theirs] / med[ours]:.2f}x "
          f"(CPU time: {cpu[theirs] / cpu[ours]:.2f}x)")  # fmt: skip
    print(f"peak memory ratio ({ours} / {theirs}, during steps): {peaks[ours] / peaks[theirs]:.2f}")
    if args.quantize:
        print(f"4-bit step / float32 step (minilora): {med[ours] / med['minilora']:.2f}x "
              f"(CPU time: {cpu[ours] / cpu['minilora']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
