"""The supervised fine-tuning loop for a model with LoRA adapters (after minilora.inject).

One optimizer step = one global batch of `batch_size * grad_accum * world_size` examples: the batch
is a pure function of (seed, step) (data.StepSampler), sorted by length and cut into micro-batches;
this process runs its `grad_accum` of them. The loss is the mean cross-entropy over every label
token of the global batch, however it is split: each micro-batch's mean is weighted by its share
of the global label count (known up front, no communication), so one process with grad_accum=2
and two processes with grad_accum=1 follow the same loss curve up to float summation order.

Scale-out is torch.distributed (DDP; the caller, e.g. torchrun + init_process_group, sets it up):
only the adapter's parameters are synchronised, rank 0 writes every file and calls the callback.

A checkpoint (out_dir/checkpoint/) holds the adapter, the optimizer (+ grad scaler) state, each
rank's RNG state, the step, the seconds trained so far, and the run's settings with their
fingerprint (base weights included). It is written to a temp folder and swapped in with renames,
so a crash never leaves a half checkpoint. The learning rate and the data order are functions of
the step, so resuming continues the exact run: the resumed run logs the numbers the uninterrupted
one logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minilora.adapter import load_adapter, save_adapter
from minilora.data import IGNORE, SFTData, StepSampler, collate, n_targets
from minilora.inject import lora_layers

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    # Folder for metrics.jsonl, checkpoint/ and the final adapter/ (peft format).
    out_dir: str = "out"
    # Optimizer steps to run; None = derive from `epochs`.
    steps: int | None = 100
    # Passes over the training data (used when steps is None).
    epochs: float | None = None
    # Examples per micro-batch per process.
    batch_size: int = 8
    # Micro-batches per optimizer step per process (global batch = batch_size * grad_accum * world size).
    grad_accum: int = 1
    # Peak learning rate of AdamW.
    lr: float = 2e-4
    # Floor of the cosine decay, as a fraction of lr.
    min_lr_ratio: float = 0.1
    # Steps of linear warmup before the cosine decay.
    warmup_steps: int = 5
    # AdamW decoupled weight decay on the adapter weights.
    weight_decay: float = 0.0
    # AdamW betas.
    beta1: float = 0.9
    beta2: float = 0.999
    # Clip the global gradient norm to this (0 = no clipping).
    grad_clip: float = 1.0
    # Autocast compute dtype: "float32" (no autocast; the CPU default), "bfloat16" or "float16"
    # (float16 adds a gradient scaler). Adapter weights stay float32 either way.
    dtype: str = "float32"
    # Recompute each layer's activations in backward instead of storing them.
    grad_checkpointing: bool = False
    # Held-out loss every this many steps (and before the first and after the last); 0 = only those two.
    eval_every: int = 0
    # Examples per eval micro-batch.
    eval_batch_size: int = 16
    # Write a checkpoint every this many steps (and always at the end); 0 = only at the end.
    save_every: int = 0
    # Log a metrics line every this many steps.
    log_every: int = 1
    # Seeds the data order and the dropout RNG (rank r uses seed + r).
    seed: int = 0
    # Batches of similar-length examples (less padding); changes the data order.
    group_by_length: bool = False
    # Continue the run in out_dir/checkpoint (its settings must match this run's).
    resume: bool = False
    # Start afresh even if out_dir already holds a checkpoint (which is then replaced).
    overwrite: bool = False

    def __post_init__(self):
        if self.steps is None and self.epochs is None:
            raise ValueError("TrainConfig needs steps or epochs")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
        if self.dtype not in AUTOCAST:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(AUTOCAST)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume and overwrite contradict each other; pick one")


AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that do not change the trajectory of a run, so a resume may change them.
NOT_FINGERPRINTED = (
    "out_dir",
    "resume",
    "overwrite",
    "eval_every",
    "save_every",
    "log_every",
    "eval_batch_size",
    "grad_checkpointing",  # recomputing a layer in backward gives the same numbers (RNG state included)
)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the update was not applied and the last good
    checkpoint is left in place."""


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based), as in nanoGPT."""
    min_lr = config.lr * config.min_lr_ratio
    # 1) linear warmup for warmup_steps steps
    if step < config.warmup_steps:
        return config.lr * (step + 1) / (config.warmup_steps + 1)
    # 2) from the last step that runs (total_steps - 1) on, the floor
    if step >= total_steps - 1:
        return min_lr
    # 3) in between, cosine decay from lr down to min_lr
    ratio = (step - config.warmup_steps) / (total_steps - 1 - config.warmup_steps)  # 0 -> 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (config.lr - min_lr)


# -----------------------------------------------------------------------------
# distributed helpers (a single process when torch.distributed is not initialised)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _world()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: SFTData, *, batch_size: int = 16, pad_id: int = 0, dtype=None) -> float:
    """Mean cross-entropy over every label token of `data` (each rank takes every world-th example)."""
    rank, world = _world()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine = sorted(range(rank, len(data), world), key=lambda i: -len(data[i][0]))
    total, count = 0.0, 0
    try:
        for start in range(0, len(mine), batch_size):
            input_ids, labels = collate([data[i] for i in mine[start : start + batch_size]], pad_id)
            n = n_targets(labels)
            if n == 0:
                continue
            with _autocast(device, dtype):
                mean = model(input_ids.to(device), labels=labels.to(device))
            total += float(mean) * n
            count += n
    finally:
        model.train(was_training)
    total, count = _all_sum([total, count], device)
    return total / max(count, 1)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# -----------------------------------------------------------------------------
# run settings, checkpoints


def run_settings(model: nn.Module, config: TrainConfig, data: SFTData, world: int) -> dict:
    """Everything that decides a run's trajectory: a resume must match it exactly."""
    train = {k: v for k, v in asdict(config).items() if k not in NOT_FINGERPRINTED}
    adapters = [[n, m.r, m.alpha, m.dropout_p, m.use_rslora] for n, m in lora_layers(model)]
    digest = hashlib.sha256()
    for ids, labels in data.examples:
        digest.update(json.dumps([ids, labels]).encode())
    base = getattr(model, "config", None)
    return {
        "train": train,
        "adapters": hashlib.sha256(json.dumps(adapters).encode()).hexdigest()[:16],
        "model": f"{type(model).__name__}:{sum(p.numel() for p in model.parameters())}:"
        + hashlib.sha256(repr(base).encode()).hexdigest()[:16],
        "base_weights": base_weights_digest(model),
        "data": f"{len(data)} examples, sha256 {digest.hexdigest()[:16]}",
        "world_size": world,
    }


def base_weights_digest(model: nn.Module, n: int = 4096) -> str:
    """Identity of the frozen weights: name, shape, dtype and n evenly spaced elements of each tensor
    (milliseconds even for 9B parameters). Two checkpoints of one architecture (gemma-3-270m and
    gemma-3-270m-it) differ here, so a resume onto the other one is caught."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // n)][:n].contiguous().cpu()  # (<= n,)
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return f"sha256 {digest.hexdigest()[:16]}"


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out: Path, model: nn.Module, optimizer, scaler, step: int, settings: dict, train_s: float
) -> None:
    """Write out/checkpoint atomically: a temp folder, then renames (all ranks call this)."""
    rank, world = _world()
    final, tmp, old = out / "checkpoint", out / ".checkpoint.tmp", out / ".checkpoint.old"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_adapter(model, tmp)
        state = {
            "step": step,
            "train_s": train_s,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "settings": settings,
            "fingerprint": fingerprint(settings),
            "base_model": getattr(model, "name_or_path", None),  # for the error message only
        }
        torch.save(state, tmp / "trainer_state.pt")
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)  # from here on the new checkpoint is the one
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def find_checkpoint(out: Path) -> Path | None:
    # A crash between the two renames leaves only the old checkpoint, under .checkpoint.old.
    for d in (out / "checkpoint", out / ".checkpoint.old"):
        if (d / "trainer_state.pt").is_file():
            return d
    return None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scaler, settings: dict) -> tuple[int, float]:
    """Restore a run; refuses a checkpoint whose settings differ from this run's. Returns its step
    and the seconds spent in training steps up to it."""
    rank, world = _world()
    state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint(settings):
        theirs, diff = state["settings"], []
        for key, value in settings.items():
            if key == "train":  # name the training settings one by one
                t0 = theirs.get("train", {})
                diff += [
                    f"{k}: checkpoint {t0.get(k)!r}, this run {v!r}"
                    for k, v in value.items()
                    if t0.get(k) != v
                ]
            elif key == "base_weights" and theirs.get(key) != value:
                ours, before = getattr(model, "name_or_path", None), state.get("base_model")
                diff.append(
                    "base_weights: the checkpoint was trained on other base weights "
                    f"({f'{before}, ' if before else ''}{theirs.get(key)}) than this run's model "
                    f"({f'{ours}, ' if ours else ''}{value}); resume with the model the run began with"
                )
            elif theirs.get(key) != value:
                diff.append(f"{key}: checkpoint {theirs.get(key)!r}, this run {value!r}")
        raise ValueError(
            f"cannot resume from {ckpt}: it belongs to a run with other settings "
            f"(fingerprint {state['fingerprint']} vs {fingerprint(settings)}):\n  "
            + "\n  ".join(diff)
            + "\nresume with the same settings, or start a new run with another out_dir or overwrite=True"
        )
    load_adapter(model, ckpt, trainable=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = ckpt / f"rng_rank{rank}.pt"
    _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return int(state["step"]), float(state.get("train_s", 0.0))


def _diverged(what: str, out: Path) -> TrainingDiverged:
    kept = find_checkpoint(out)
    return TrainingDiverged(
        f"{what}; stopped before applying that update. "
        + (f"The last good checkpoint is {kept}. " if kept else "No checkpoint was written yet. ")
        + "Lower the learning rate (or use float32 / bfloat16 instead of float16) and retry."
    )


def _write_metrics_upto(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= step (a resumed run rewrites what came after)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() and step >= 0 else []
    kept = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            info = json.loads(line)
            keep = info["step"] <= step
        except (ValueError, TypeError, KeyError) as e:
            if not any(rest.strip() for rest in lines[lineno:]):  # a run killed while appending it
                log.warning("%s:%d: dropping a half-written last line %r", path, lineno, line)
                continue
            raise ValueError(
                f"{path}:{lineno}: not a metrics line ({e!r}); fix or delete that line and resume again"
            ) from None
        if keep:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# the loop


def train(
    model: nn.Module,
    tok,
    train_data: SFTData,
    eval_data: SFTData | None,
    config: TrainConfig,
    callback=None,
) -> dict:
    """Fine-tune the adapter parameters of `model` (the rest stays frozen). `callback(info)` gets a
    dict per logged step on rank 0 (step, steps, loss, lr, tokens_per_s, eta_s, eval_loss where
    measured). Returns the final step, loss, eval_loss and the adapter folder."""
    previous = getattr(model, "gradient_checkpointing", None)
    try:
        return _train(model, tok, train_data, eval_data, config, callback)
    finally:  # the switch goes back to what it was, however the run ends
        if previous is not None:
            model.gradient_checkpointing = previous


def _train(model, tok, train_data, eval_data, config, callback) -> dict:
    rank, world = _world()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not any(True for _ in lora_layers(model)):
        raise ValueError(
            "the model has no trainable LoRA parameters; call minilora.inject(model, config) first"
        )
    pad_id = getattr(tok, "pad_id", 0)
    out = Path(config.out_dir)
    G = config.batch_size * config.grad_accum * world
    sampler = StepSampler(train_data.lengths, G, config.seed, config.group_by_length)
    total_steps = config.steps if config.steps is not None else sampler.steps_for_epochs(config.epochs)
    autocast_dtype = AUTOCAST[config.dtype]
    if config.grad_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise ValueError(f"{type(model).__name__} has no gradient_checkpointing switch")
        model.gradient_checkpointing = True

    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type) if config.dtype == "float16" else None
    settings = run_settings(model, config, train_data, world)
    metrics_path = out / "metrics.jsonl"

    # 1) fresh start or resume
    start, train_s = 0, 0.0
    ckpt = find_checkpoint(out)
    if config.resume:
        if ckpt is None:
            raise FileNotFoundError(
                f"resume: {out} holds no checkpoint to continue; drop resume to start afresh"
            )
        start, train_s = load_checkpoint(ckpt, model, optimizer, scaler, settings)
        log.info("resumed from %s at step %d", ckpt, start)
    else:
        if ckpt is not None and not config.overwrite:
            raise FileExistsError(
                f"{out} already holds a run's checkpoint; pass resume=True (--resume) to continue it, "
                "overwrite=True (--overwrite) to start over, or choose another out_dir"
            )
        torch.manual_seed(config.seed + rank)  # dropout masks; each rank its own stream
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_metrics_upto(metrics_path, start if config.resume else -1)
        if not config.resume:  # overwrite: a crash must leave nothing of the old run to resume or use
            for old in (out / "checkpoint", out / ".checkpoint.old", out / "adapter"):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Only the adapter is synchronised; the frozen base is loaded identically on every rank.
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    def log_line(info: dict) -> None:
        if rank != 0:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
        log.info("%s", info)
        if callback is not None:
            callback(info)

    def run_eval() -> float | None:
        if eval_data is None:
            return None
        return evaluate(
            model, eval_data, batch_size=config.eval_batch_size, pad_id=pad_id, dtype=autocast_dtype
        )

    if start == 0 and eval_data is not None:
        log_line({"step": 0, "eval_loss": run_eval()})

    # 2) the steps
    model.train()
    # (seconds, tokens) of the last 10 steps, eval and saving excluded: speed and ETA from recent steps
    recent: deque[tuple[float, int]] = deque(maxlen=10)
    loss, eval_loss = float("nan"), None
    for step in range(start, total_steps):
        t_step = time.perf_counter()
        lr = lr_at(step, config, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sorted((train_data[i] for i in sampler.indices(step)), key=lambda ex: -len(ex[0]))
        n_global = sum(n_targets(labels) for _, labels in batch)
        bs = config.batch_size
        micro = [
            batch[k * bs : (k + 1) * bs]
            for k in range(rank * config.grad_accum, (rank + 1) * config.grad_accum)
        ]
        loss_sum = 0.0
        for j, examples in enumerate(micro):
            input_ids, labels = collate(examples, pad_id)
            n = n_targets(labels)
            sync = world == 1 or j == len(micro) - 1
            with nullcontext() if sync else net.no_sync():
                with _autocast(device, autocast_dtype):
                    mean = net(input_ids.to(device), labels=labels.to(device))  # mean CE over n tokens
                # DDP averages gradients over ranks, hence * world: the sum over ranks is the global mean.
                part = mean * (n * world / max(n_global, 1))
                (scaler.scale(part) if scaler is not None else part).backward()
            loss_sum += float(mean.detach()) * n
        loss_sum, _ = _all_sum([loss_sum, 0.0], device)
        loss = loss_sum / max(n_global, 1)
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise _diverged(f"loss is {loss} at step {step + 1}", out)
        if scaler is not None:
            scaler.unscale_(optimizer)
        # The total norm of the (synchronised) gradients; clipping off = a max norm of inf.
        norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
        if scaler is not None:  # float16: a non-finite gradient is expected, the scaler skips that step
            scaler.step(optimizer)
            scaler.update()
        elif not math.isfinite(norm := float(norm)):  # a finite loss can still overflow in backward
            optimizer.zero_grad(set_to_none=True)
            raise _diverged(f"gradient norm is {norm} at step {step + 1}", out)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # 3) report, evaluate, save
        done = step + 1
        recent.append((time.perf_counter() - t_step, sum(len(ids) for ids, _ in batch)))
        train_s += recent[-1][0]
        eval_loss = None
        if eval_data is not None and (
            (config.eval_every and done % config.eval_every == 0) or done == total_steps
        ):
            eval_loss = run_eval()
        if done % config.log_every == 0 or done == total_steps or eval_loss is not None:
            info = {"step": done, "loss": loss, "lr": lr}
            if eval_loss is not None:
                info["eval_loss"] = eval_loss
            seconds, tokens = sum(t for t, _ in recent), sum(n for _, n in recent)
            info.update(
                steps=total_steps,
                tokens_per_s=tokens / seconds,
                train_s=train_s,
                eta_s=(total_steps - done) * seconds / len(recent),
            )
            log_line(info)
        if (config.save_every and done % config.save_every == 0) or done == total_steps:
            save_checkpoint(out, model, optimizer, scaler, done, settings, train_s)

    # 4) the final adapter, in peft's format
    adapter_dir = out / "adapter"
    if rank == 0:
        save_adapter(model, adapter_dir)
    _barrier()
    return {
        "step": total_steps,
        "loss": loss,
        "eval_loss": eval_loss,
        "train_s": train_s,  # seconds in training steps (this process), eval and saving excluded
        "adapter_dir": str(adapter_dir),
    }


__all__ = ["IGNORE", "TrainConfig", "TrainingDiverged", "evaluate", "lr_at", "train"]
