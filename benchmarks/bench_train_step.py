"""One LoRA SFT step on the real Gemma 3 270M: minilora against transformers + peft.

    python benchmarks/bench_train_step.py [--repeats 5]

The step: a batch of 4 x 128 tokens whose last quarter carries labels (three quarters of each
sequence prompt-masked), LoRA r=8 / alpha 16 on q,k,v,o, float32, forward + backward + AdamW.
Both sides load the same weights (minilora.gguf.default_model_dir()) and get the same batch.

Method. Each side lives in its own process (so each has its own peak memory); the parent asks them
for one step at a time, alternating minilora / peft, and reports the median step time of each.
Peak memory: after loading and building the adapter, each child resets its kernel high-water mark
(writing "5" to /proc/self/clear_refs resets VmHWM) and reads VmHWM after its last step: the peak
resident memory of the steps themselves, weights included. The loading peak, read before the
reset, is printed too (on Linux ru_maxrss is that same counter, so it cannot give a whole-process
peak after the reset). Step-0 losses must agree (B = 0 at init on both sides, so both compute the
base model's loss): checked to 1e-4 relative.

transformers + peft computes logits at all 512 positions; minilora's Gemma runs its output head
only at the 128 positions that carry a label, which is where most of its lead comes from.
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
    if side == "minilora":
        import minilora
        from minilora.gemma import from_pretrained

        model = from_pretrained(path, dtype=torch.float32)
        minilora.inject(
            model, minilora.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        loss_fn = lambda: model(input_ids, labels=labels)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
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
        t = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        loss = loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        conn.send((loss.item(), time.perf_counter() - t))
    conn.send(vm_hwm_mb())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (after one warm-up step)")
    args = p.parse_args()
    from minilora.gguf import default_model_dir

    default_model_dir()  # convert once, before the children race for it
    ctx = mp.get_context("spawn")
    sides = ("minilora", "peft")
    conns, procs = {}, {}
    for side in sides:  # load one at a time: loading is not what is measured
        parent, child_end = ctx.Pipe()
        procs[side] = ctx.Process(target=child, args=(side, child_end))
        procs[side].start()
        load_peak, n_params = parent.recv()
        conns[side] = parent
        print(
            f"{side:9s} ready: {n_params:,} trainable parameters; peak RSS while loading {load_peak:.0f} MB"
        )
    losses, times = {s: [] for s in sides}, {s: [] for s in sides}
    for _ in range(args.repeats + 1):  # alternate the two sides step by step
        for side in sides:
            conns[side].send("step")
            loss, dt = conns[side].recv()
            losses[side].append(loss)
            times[side].append(dt)
    peaks = {}
    for side in sides:
        conns[side].send("stop")
        peaks[side] = conns[side].recv()
        procs[side].join()

    m, q = losses["minilora"][0], losses["peft"][0]
    print(f"step-0 loss: minilora {m:.6f}  transformers+peft {q:.6f}  (rel. diff {abs(m - q) / abs(q):.1e})")
    assert abs(m - q) <= 1e-4 * abs(q), "step-0 losses differ: the two sides do not compute the same model"
    med = {s: statistics.median(times[s][1:]) for s in sides}  # step 0 is the warm-up
    for s in sides:
        steps = " ".join(f"{t:.2f}" for t in times[s][1:])
        print(f"{s:9s} step {med[s]:6.2f} s (median of {args.repeats}: {steps})  "
              f"peak RSS in steps {peaks[s]:6.0f} MB")  # fmt: skip
    print(f"speed-up (peft time / minilora time): {med['peft'] / med['minilora']:.2f}x")
    print(f"peak memory ratio (minilora / peft, during steps): {peaks['minilora'] / peaks['peft']:.2f}")


if __name__ == "__main__":
    main()
