"""Fine-tune Gemma with LoRA on a JSON-lines dataset; report held-out loss and exact match before/after.

With no arguments: the real Gemma 3 270M learns the bundled task in examples/data/ (ISO date -> "the
10th of February, 1987"; see make_data.py), float32 on CPU, on the very weights llama.cpp serves: its
Q4_K_M GGUF file (minilora.gguf.default_gguf()), read as it is and dequantized layer by layer.

    python examples/train_gemma.py
    python examples/train_gemma.py --data my.jsonl --eval-data my_eval.jsonl --steps 200 --out runs/mine
    python examples/train_gemma.py --data qa.jsonl --template "### context: {input}\\n### answer: {target}"
    torchrun --nproc_per_node=2 examples/train_gemma.py --batch-size 4     # DDP: same global batch of 8
    python examples/train_gemma.py --resume                                # continue an interrupted run

Files in --out: metrics.jsonl (one line per logged step), checkpoint/ (resumable), adapter/ (peft's
format: PeftModel.from_pretrained(transformers_model, "runs/train_gemma/adapter") loads it) and, for a
.gguf model, adapter.gguf (llama.cpp's LoRA format: llama-server -m MODEL.gguf --lora adapter.gguf).
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import minilora
from minilora.checkpoint import from_pretrained, resolve_dtype
from minilora.data import load_dataset, prompt_and_target
from minilora.tokenizer import Tokenizer
from minilora.train import TrainConfig, train

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a Gemma 3 .gguf file (kept quantized) or a Hugging Face style Gemma folder "
        "(default: the real Gemma 3 270M's Q4_K_M GGUF file)",
    )
    p.add_argument(
        "--data", default=os.path.join(HERE, "data", "dates_train.jsonl"), help="training JSON lines"
    )
    p.add_argument(
        "--eval-data", default=os.path.join(HERE, "data", "dates_eval.jsonl"), help="held-out JSON lines"
    )
    p.add_argument("--format", default="auto", help="auto, text, prompt_completion, alpaca, chat or template")
    p.add_argument(
        "--template", default=None, help='e.g. "### context: {input}\\n### q: {target}" (last = completion)'
    )
    p.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated modules, or all-linear"
    )
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps (ignored with --epochs)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--warmup", type=int, default=3, help="warmup steps")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument(
        "--group-by-length", action="store_true", help="batch similar lengths together (less padding)"
    )
    p.add_argument(
        "--dtype", default="auto", help="auto (float32 on CPU, bf16 on a GPU), float32, bfloat16, float16"
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--eval-every", type=int, default=0, help="held-out loss every N steps (0: before and after)"
    )
    p.add_argument(
        "--eval-examples", type=int, default=60, help="held-out examples for exact match (0: skip)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation length for exact match")
    p.add_argument("--out", default="runs/train_gemma")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return p.parse_args(argv)


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids) -> list[list[int]]:
    """Greedy continuations of equal-length prompts in one batch with a KV cache: the output head
    (262k x 640 floats, read once per token) is shared by the whole batch."""
    device = model.model.embed_tokens.weight.device
    cache, step_input = model.new_cache(), torch.tensor(prompts, device=device)  # (B, T)
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        tokens = model(step_input, cache=cache, last_logits_only=True)[:, -1].argmax(-1).tolist()  # (B,)
        for b, t in enumerate(tokens):
            done[b] = done[b] or t in stop_ids
            if not done[b]:
                out[b].append(t)
        if all(done):
            break
        step_input = torch.tensor(tokens, device=device)[:, None]  # (B, 1)
    return out


def exact_match(model, tok, data, n, max_new_tokens, batch=32):
    """Greedy completions of the first n held-out prompts; (fraction equal to the target, one sample)."""
    was_training = model.training
    model.eval()
    pairs = [prompt_and_target(r, data.format, data.template, tok=tok) for r in data.records[:n]]
    # as data.py encodes a prompt: <bos> + its own ids; prompts of one length share a batch
    ids = [[tok.bos_id] + tok.encode(p, add_bos=False) for p, _ in pairs]
    by_len: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_len.setdefault(len(x), []).append(i)
    texts = [""] * len(pairs)
    for group in by_len.values():
        for k in range(0, len(group), batch):
            chunk = group[k : k + batch]
            for i, new in zip(
                chunk,
                greedy_batch(model, [ids[i] for i in chunk], max_new_tokens, set(tok.stop_ids)),
                strict=True,
            ):
                texts[i] = tok.decode(new)
    model.train(was_training)
    hits = sum(text.strip() == target.strip() for text, (_, target) in zip(texts, pairs, strict=True))
    return hits / max(1, len(pairs)), (pairs[0][0], texts[0], pairs[0][1])


def main(argv=None):
    args = parse_args(argv)
    # 1) processes: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    say = print if rank == 0 else (lambda *a, **k: None)
    t_start = time.perf_counter()

    # 2) model, tokenizer, data
    if args.model is None:
        from minilora.gguf import default_gguf

        args.model = str(default_gguf())
    dtype = resolve_dtype(args.dtype, device)
    model = from_pretrained(args.model, dtype=dtype, device=device)
    tok = Tokenizer(args.model)
    kw = dict(format=args.format, template=args.template, max_len=args.max_len)
    train_data = load_dataset(args.data, tok, **kw)
    eval_data = load_dataset(args.eval_data, tok, **kw) if args.eval_data else None
    say(f"model {args.model} ({dtype}, {device}, {world} process(es))")
    say(f"train: {train_data.summary()}")
    if eval_data is not None:
        say(f"eval:  {eval_data.summary()}")

    # 3) LoRA
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    torch.manual_seed(args.seed)
    lora = minilora.LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets)
    names = minilora.inject(model, lora)
    trainable, total = minilora.count_parameters(model)
    say(f"LoRA r={args.r} alpha={args.alpha:g} on {len(names)} modules: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")  # fmt: skip

    # 4) before: held-out exact match and a sample (rank 0; the others wait)
    n_em = args.eval_examples if eval_data is not None else 0
    if rank == 0 and n_em:
        t = time.perf_counter()
        em_before, (prompt, got, want) = exact_match(model, tok, eval_data, n_em, args.max_new_tokens)
        say(f"sample before: {prompt!r} -> {got!r} (want {want!r})")
        say(f"held-out exact match before: {100 * em_before:.1f}% of {min(n_em, len(eval_data))} "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
    if world > 1:
        dist.barrier()

    # 5) train
    config = TrainConfig(
        out_dir=args.out, steps=None if args.epochs else args.steps, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
        dtype="float32" if dtype == torch.float32 else str(dtype).removeprefix("torch."),
        grad_checkpointing=args.grad_checkpointing, group_by_length=args.group_by_length,
        eval_every=args.eval_every, seed=args.seed,
        resume=args.resume, overwrite=args.overwrite,
    )  # fmt: skip

    def progress(info):
        line = f"step {info['step']:4d}"
        if "loss" in info:
            line += (f"/{info['steps']}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                     f"{info['tokens_per_s']:.0f} tok/s  ETA {info['eta_s']:.0f} s")  # fmt: skip
        if "eval_loss" in info:
            line += f"  eval_loss {info['eval_loss']:.4f}"
        say(line, flush=True)

    t = time.perf_counter()
    result = train(model, tok, train_data, eval_data, config, callback=progress)
    train_s = result["train_s"]
    say(f"trained {result['step']} steps: {train_s:.0f} s in steps, {time.perf_counter() - t:.0f} s with "
        f"held-out loss and checkpoints; adapter (peft format) in {result['adapter_dir']}")  # fmt: skip

    # 6) after
    if rank == 0 and n_em:
        em_after, (prompt, got, want) = exact_match(model, tok, eval_data, n_em, args.max_new_tokens)
        say(f"sample after: {prompt!r} -> {got!r} (want {want!r})")
        say(f"held-out exact match before: {100 * em_before:.1f}%  after: {100 * em_after:.1f}%")
    if rank == 0 and eval_data is not None:
        import json

        with open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8") as f:
            evals = [m["eval_loss"] for m in map(json.loads, f) if "eval_loss" in m]
        say(f"held-out loss before: {evals[0]:.4f}  after: {evals[-1]:.4f}")
    if rank == 0 and args.model.endswith(".gguf"):
        from minilora.gguf import export_adapter

        served = os.path.join(args.out, "adapter.gguf")
        export_adapter(result["adapter_dir"], served, base=args.model)
        say(f"llama.cpp's LoRA file: {served}; serve it with\n  llama-server -m {args.model} --lora {served}")
    say(f"total time {time.perf_counter() - t_start:.0f} s (training steps {train_s:.0f} s)")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
