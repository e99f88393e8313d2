"""The real Gemma 3 270M read packed from its Q4_K_M GGUF file vs the float32 folder converted from it:
the same logits, and the memory of each (issue 13, acceptance 2).

    python benchmarks/bench_gguf.py [--steps 3] [--threads N]

Each side runs in its own process: load (peak RSS after loading, minus the RSS after the imports),
a forward of 6 tokens (its logits go back to the parent, which compares them), LoRA r=8 on q,k,v,o,
then training steps on bench_train_step.py's batch (4 x 128 tokens, 32 labelled): the peak RSS of the
steps (VmHWM reset before them, weights included) and the median step time. The step-0 losses must
agree as the logits do: both sides compute with the same float32 weights.
"""

import argparse
import multiprocessing as mp
import statistics
import time

from bench_train_step import batch, vm_hwm_mb, vm_rss_mb


def child(side: str, threads: int | None, conn) -> None:
    import torch

    import minilora
    from minilora.gguf import default_gguf, default_model_dir

    if threads:
        torch.set_num_threads(threads)
    path = default_gguf() if side == "gguf" else default_model_dir()
    before = vm_rss_mb()
    model = minilora.gemma.from_pretrained(path, dtype=torch.float32)
    load_peak, loaded = vm_hwm_mb() - before, vm_rss_mb() - before
    with torch.no_grad():
        logits = model(torch.tensor([[2, 818, 5279, 529, 7001, 563]]))[0, -1]
    lora = minilora.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    minilora.inject(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids, labels = batch()
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: from here on, the steps' peak
        f.write("5")
    losses, times = [], []
    for _ in range(conn.recv()):
        t = time.perf_counter()
        loss = model(input_ids, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    conn.send(dict(load_peak=load_peak, loaded=loaded, logits=logits, losses=losses, times=times,
                   step_peak=vm_hwm_mb(), params=minilora.count_parameters(model)[1]))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="training steps per side (the first warms up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    from minilora.gguf import default_gguf, default_model_dir

    default_gguf(), default_model_dir()  # assemble / convert once, before the children
    ctx, results = mp.get_context("spawn"), {}
    for side in ("gguf", "float32 folder"):  # one at a time: each has the machine to itself
        parent, end = ctx.Pipe()
        proc = ctx.Process(target=child, args=(side, args.threads, end))
        proc.start()
        parent.send(args.steps)
        results[side] = parent.recv()
        proc.join()
    g, f = results["gguf"], results["float32 folder"]
    diff = (g["logits"] - f["logits"]).abs().max().item()
    print(f"last-position logits: max |difference| {diff:.2e} (of max |logit| {f['logits'].abs().max():.1f})")
    print(f"step-0 loss: gguf {g['losses'][0]:.6f}  float32 folder {f['losses'][0]:.6f}")
    for side, r in results.items():
        step = statistics.median(r["times"][1:] or r["times"])
        print(f"{side:15s} {r['params']:,} parameters; RSS after loading {r['loaded']:5.0f} MB (peak while "
              f"loading {r['load_peak']:5.0f} MB); peak in training steps {r['step_peak']:5.0f} MB; "
              f"step {step:.2f} s")  # fmt: skip
    print(f"gguf / float32 folder: after loading {g['loaded'] / f['loaded']:.2f}x, "
          f"in training steps {g['step_peak'] / f['step_peak']:.2f}x")  # fmt: skip
    assert abs(g["losses"][0] - f["losses"][0]) <= 1e-5 * abs(f["losses"][0]), "the two sides differ"


if __name__ == "__main__":
    main()
