"""The supervised fine-tuning loop for a model with LoRA adapters (after minilora.inject), laid out
as nanoGPT's: the settings, one optimizer step (`train_step`), evaluation, logging and checkpoints,
then `train`, which sets up and loops.

One optimizer step = one global batch of `batch_size * grad_accum * world_size` examples: the batch
is a pure function of (seed, step) (data.StepSampler), sorted by length and cut into micro-batches;
this process runs its `grad_accum` of them. The loss is the mean cross-entropy over every label
token of the global batch, however it is split: each micro-batch's mean is weighted by its share
of the global label count (known up front, no communication), so one process with grad_accum=2
and two processes with grad_accum=1 follow the same loss curve up to float summation order.

Scale-out is torch.distributed (DDP; the caller, e.g. torchrun + init_process_group, sets it up):
only the adapter's parameters are synchronised, rank 0 writes every file and calls the callback.

A checkpoint (out_dir/checkpoint/) holds the adapter, the optimizer (+ grad scaler) state, each
rank's RNG state, the step, the seconds trained so far, and the settings that decide the run's
trajectory (base weights included). It is swapped in whole (minilora.atomic). The learning rate and
the data order are functions of the step, so resuming continues the exact run: the resumed run logs
the numbers the uninterrupted one logs. Nothing in it is pickled (a run folder may come from
anyone): tensors are safetensors, the rest JSON, and manifest.json, read first, holds the settings
and every file's sha256, checked before any other file is read.

While a run trains, out_dir/.lock keeps a second run out of the folder, and Ctrl-C or SIGTERM stops
it after the current step with a checkpoint (TrainingInterrupted).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from minilora.adapter import adapter_files, load_adapter, save_adapter
from minilora.atomic import fsync_dir, previous, remove_temporaries, replace_folder, write_error, write_files
from minilora.checkpoint import json_loads, read_json
from minilora.data import SFTData, StepSampler, collate, n_targets
from minilora.inject import lora_layers

try:
    import fcntl
except ImportError:  # Windows: no run lock
    fcntl = None

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
    # Also write one when this many minutes have passed since the last; 0 = by steps only.
    save_every_minutes: float = 0.0
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
        for valid, test, names in _VALID:
            for name in names.split():
                v = getattr(self, name)
                finite = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                if not (finite and test(v)) and not (v is None and name in ("steps", "epochs")):
                    raise ValueError(f"TrainConfig.{name} must be {valid}, got {v!r}")
        if self.dtype not in AUTOCAST:
            raise ValueError(f"TrainConfig.dtype must be one of {sorted(AUTOCAST)}, got {self.dtype!r}")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: resume and overwrite contradict each other; pick one")


# What each TrainConfig number must be: in words, as a test (of a finite int or float), which fields.
_VALID = [
    ("an integer >= 1", lambda v: v >= 1 and v % 1 == 0, "steps batch_size grad_accum eval_batch_size "
                                                         "log_every"),
    ("an integer >= 0", lambda v: v >= 0 and v % 1 == 0, "warmup_steps eval_every save_every"),
    ("an integer", lambda v: v % 1 == 0, "seed"),
    ("a number > 0", lambda v: v > 0, "lr epochs"),
    ("a number >= 0", lambda v: v >= 0, "grad_clip weight_decay save_every_minutes"),
    ("in [0, 1]", lambda v: 0 <= v <= 1, "min_lr_ratio beta1 beta2"),
]  # fmt: skip
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Settings that do not change the trajectory of a run, so a resume may change them (recomputing a
# layer in backward gives the same numbers, RNG state included, hence grad_checkpointing).
RESUME_MAY_CHANGE = ("out_dir", "resume", "overwrite", "eval_every", "save_every", "save_every_minutes",
                     "log_every", "eval_batch_size", "grad_checkpointing")  # fmt: skip
MANIFEST, STATE, LOCK = "manifest.json", "trainer_state.safetensors", ".lock"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the update was not applied and the last good
    checkpoint is left in place."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM stopped the run after a step, with a checkpoint of that step."""

    def __init__(self, signum: int, step: int, checkpoint: Path):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {checkpoint}")


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
# one optimizer step


def train_step(
    net: nn.Module, micro_batches: list, n_global: int, optimizer, scaler, config: TrainConfig
) -> float:
    """Forward and backward on each of this process's (input_ids, labels) micro-batches (gradients
    accumulate; under DDP they are synchronised on the last one only), then clip and step. Returns
    the mean loss over the global batch's `n_global` label tokens. A non-finite loss or gradient norm
    raises TrainingDiverged before the update (under float16 the grad scaler skips such a step)."""
    _, world = _world()
    device = next(net.parameters()).device
    loss_sum = 0.0
    for j, (input_ids, labels) in enumerate(micro_batches):
        n = n_targets(labels)
        with net.no_sync() if world > 1 and j < len(micro_batches) - 1 else nullcontext():
            with _autocast(device, AUTOCAST[config.dtype]):
                mean = net(input_ids.to(device), labels=labels.to(device))  # mean CE over n tokens
            # DDP averages gradients over ranks, hence * world: the sum over ranks is the global mean.
            part = mean * (n * world / max(n_global, 1))
            (scaler.scale(part) if scaler is not None else part).backward()
        loss_sum += float(mean.detach()) * n
    loss = _all_sum([loss_sum], device)[0] / max(n_global, 1)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"loss is {loss}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    # The total norm of the (synchronised) gradients; clipping off = a max norm of inf.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip if config.grad_clip > 0 else math.inf)
    if scaler is not None:  # float16: a non-finite gradient is expected, the scaler skips that step
        scaler.step(optimizer)
        scaler.update()
    elif not math.isfinite(norm := float(norm)):  # a finite loss can still overflow in backward
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"gradient norm is {norm}")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _micro_batches(data: SFTData, indices: list[int], config: TrainConfig, pad_id: int):
    """This process's micro-batches of the global batch `indices` (sorted by length, so that each
    pads little), and the global batch's label and token counts."""
    rank, _ = _world()
    batch = sorted((data[i] for i in indices), key=lambda ex: -len(ex[0]))
    bs, first = config.batch_size, rank * config.grad_accum
    micro = [collate(batch[k * bs : (k + 1) * bs], pad_id) for k in range(first, first + config.grad_accum)]
    return micro, sum(n_targets(labels) for _, labels in batch), sum(len(ids) for ids, _ in batch)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Only the adapter is synchronised; the frozen base is loaded identically on every rank.
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# -----------------------------------------------------------------------------
# evaluation and logging


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


def log_metrics(out: Path, info: dict, callback=None) -> None:
    """Append `info` to out/metrics.jsonl, log it and pass it to `callback` (rank 0 only)."""
    if _world()[0] != 0:
        return
    try:
        with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(info) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise write_error(e, out / "metrics.jsonl") from e
    log.info("%s", info)
    if callback is not None:
        callback(info)


def _keep_metrics_upto(path: Path, step: int) -> None:
    """Keep the metric lines of steps <= step (a resumed run rewrites what came after)."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() and step >= 0 else []
    kept = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, TypeError, KeyError) as e:
            if not any(rest.strip() for rest in lines[lineno:]):  # a run killed while appending it
                log.warning("%s:%d: dropping a half-written last line %r", path, lineno, line)
                continue
            raise ValueError(
                f"{path}:{lineno}: not a metrics line ({e!r}); fix or delete that line and resume again"
            ) from None
        if keep:
            kept.append(line)
    write_files({path: lambda p: p.write_text("".join(line + "\n" for line in kept), encoding="utf-8")})


# -----------------------------------------------------------------------------
# checkpoints


def run_settings(model: nn.Module, config: TrainConfig, data: SFTData, world: int) -> dict:
    """Everything that decides a run's trajectory, which a resume must match: the training settings,
    the adapters, the model (architecture, size, base weights), the data and the world size."""
    adapters = [[n, m.r, m.alpha, m.dropout_p, m.use_rslora] for n, m in lora_layers(model)]
    size = sum(p.numel() for p in model.parameters())
    return {
        **{k: v for k, v in asdict(config).items() if k not in RESUME_MAY_CHANGE},
        "adapters": _sha256([json.dumps(adapters).encode()]),
        "model": f"{type(model).__name__}:{size}:" + _sha256([repr(getattr(model, "config", None)).encode()]),
        "base_weights": base_weights_digest(model),
        "data": f"{len(data)} examples, sha256 " + _sha256(json.dumps(ex).encode() for ex in data.examples),
        "world_size": world,
    }


def base_weights_digest(model: nn.Module, n: int = 4096) -> str:
    """Identity of the frozen weights: name, shape, dtype and n evenly spaced elements of each tensor
    (milliseconds even for 9B parameters). Two checkpoints of one architecture (gemma-3-270m and
    gemma-3-270m-it) differ here, so a resume onto the other one is caught."""

    def chunks():
        for name, p in model.named_parameters():
            if not p.requires_grad:
                flat = p.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // n)][:n].contiguous().cpu()  # (<= n,)
                yield f"{name}:{tuple(p.shape)}:{p.dtype};".encode()
                yield sample.view(torch.uint8).numpy().tobytes()

    return "sha256 " + _sha256(chunks())


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()[:16]


def save_checkpoint(
    out: Path, model: nn.Module, optimizer, scaler, step: int, settings: dict, train_s: float
) -> None:
    """Write out/checkpoint (all ranks call this): its files go into a temp folder, manifest.json
    (the settings and each file's sha256) last, which is then swapped in whole
    (minilora.atomic.replace_folder)."""
    rank, _ = _world()
    tmp = out / ".checkpoint.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    write_files({tmp / f"rng_rank{rank}.safetensors": _state_file(_rng_state())})
    if rank == 0:
        state = {"step": step, "train_s": train_s, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None}  # fmt: skip
        files = {tmp / name: write for name, write in adapter_files(model).items() if write is not None}
        write_files({**files, tmp / STATE: _state_file(state)})
    _barrier()
    if rank == 0:
        manifest = {
            "settings": settings,
            "base_model": getattr(model, "name_or_path", None),  # for the error message only
            "sha256": {p.name: _file_sha256(p) for p in sorted(tmp.iterdir())},
        }
        text = json.dumps(manifest, indent=1)
        write_files({tmp / MANIFEST: lambda p: p.write_text(text, encoding="utf-8")})
        replace_folder(tmp, out / "checkpoint")
    _barrier()


def _state_file(obj):
    """A writer (for minilora.atomic) of `obj`, nested dicts and lists of tensors and JSON values, as
    one safetensors file: the tensors, and the rest as JSON in its metadata; no pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(obj, tensors))
    return lambda path: save_file(tensors, path, metadata={"state": skeleton})


def _encode(obj, tensors: dict):
    """`obj` as JSON: a tensor becomes {"tensor": its name in `tensors`}, a dict {"items": [[key,
    value], ...]} (optimizer states have int keys), a tuple a list."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"tensor": name}
    if isinstance(obj, dict):
        return {"items": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint holds tensors, dicts, lists and JSON values, not {type(obj).__name__}")


def _read_state(path: Path):
    """The object a _state_file wrote."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safe_open has no __iter__
        skeleton = json_loads((f.metadata() or {})["state"])

    def decode(x):
        if isinstance(x, list):
            return [decode(v) for v in x]
        if isinstance(x, dict):
            return tensors[x["tensor"]] if "tensor" in x else {decode(k): decode(v) for k, v in x["items"]}
        return x

    return decode(skeleton)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(iter(lambda: f.read(1 << 20), b""))


def find_checkpoint(out: Path) -> Path | None:
    # A crash while the new checkpoint is swapped in leaves the old one whole, at previous().
    for d in (out / "checkpoint", previous(out / "checkpoint")):
        if (d / MANIFEST).is_file() or (d / "trainer_state.pt").is_file():  # (.pt: an old minilora's)
            return d
    return None


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scaler, settings: dict) -> tuple[int, float]:
    """Restore a run; refuses a checkpoint whose settings differ from this run's, or whose files differ
    from their sha256 in manifest.json, before any other file is read. Returns its step and the
    seconds spent in training steps up to it."""
    _check_manifest(ckpt, model, settings)
    state = _read_state(ckpt / STATE)
    load_adapter(model, ckpt, trainable=True)
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    rng = _read_state(ckpt / f"rng_rank{_world()[0]}.safetensors")
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"]), float(state["train_s"])


def _check_manifest(ckpt: Path, model: nn.Module, settings: dict) -> None:
    """Refuse the checkpoint unless its settings are this run's and every file in it is listed in its
    manifest.json with that file's sha256 (an old minilora's pickle files are never read)."""
    if not (ckpt / MANIFEST).is_file():
        raise ValueError(
            f"{ckpt} was written by an older minilora, in pickle files (trainer_state.pt), which are not "
            "read: unpickling can run code. Start the run over (overwrite=True, --overwrite)"
        )
    manifest = read_json(ckpt / MANIFEST)
    theirs, digests = manifest.get("settings"), manifest.get("sha256")
    if not isinstance(theirs, dict) or not isinstance(digests, dict):
        raise ValueError(f"{ckpt / MANIFEST} is not a minilora checkpoint manifest (settings, sha256)")
    diff = [f"{k}: checkpoint {theirs.get(k)!r}, this run {settings.get(k)!r}"
            for k in {**theirs, **settings} if theirs.get(k) != settings.get(k)]  # fmt: skip
    if theirs.get("base_weights") != settings["base_weights"]:
        diff.append(
            f"the checkpoint was trained on other base weights ({manifest.get('base_model')}) than this "
            f"run's model ({getattr(model, 'name_or_path', None)}); resume with the model the run began with"
        )
    if diff:
        raise ValueError(
            f"cannot resume from {ckpt}: it belongs to a run with other settings:\n  " + "\n  ".join(diff)
            + "\nresume with the same settings, or start a new run with another out_dir or overwrite=True"
        )  # fmt: skip
    needed = {STATE, f"rng_rank{_world()[0]}.safetensors"}
    for name in sorted({p.name for p in ckpt.iterdir()} - {MANIFEST} | needed):
        problem = (
            "is missing" if not (ckpt / name).is_file()
            else f"is not listed in {MANIFEST}" if name not in digests
            else f"differs from its sha256 in {MANIFEST}" if digests[name] != _file_sha256(ckpt / name)
            else None
        )  # fmt: skip
        if problem:
            raise ValueError(
                f"{ckpt / name} {problem}: the checkpoint is damaged or was edited; resume from an intact "
                "copy, or start over (overwrite=True, --overwrite)"
            )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _start(out: Path, model: nn.Module, optimizer, scaler, settings: dict, config: TrainConfig):
    """Resume from out's checkpoint (config.resume) or start afresh; returns (first step, seconds
    trained so far)."""
    rank, _ = _world()
    start, train_s = 0, 0.0
    if rank == 0:  # and clean up what writes that a crash interrupted left behind
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(out / ".checkpoint.tmp", ignore_errors=True)
        for name in ("checkpoint", "adapter", "metrics.jsonl"):
            remove_temporaries(out / name)
    _barrier()
    ckpt = find_checkpoint(out)
    if config.resume:
        if ckpt is None:
            raise FileNotFoundError(
                f"resume: {out} holds no checkpoint to continue; drop resume to start afresh"
            )
        start, train_s = load_checkpoint(ckpt, model, optimizer, scaler, settings)
        log.info("resumed from %s at step %d", ckpt, start)
    elif ckpt is not None and not config.overwrite:
        raise FileExistsError(
            f"{out} already holds a run's checkpoint; pass resume=True (--resume) to continue it, "
            "overwrite=True (--overwrite) to start over, or choose another out_dir"
        )
    else:
        torch.manual_seed(config.seed + rank)  # dropout masks; each rank its own stream
    if rank == 0:
        _keep_metrics_upto(out / "metrics.jsonl", start if config.resume else -1)
        if not config.resume:  # overwrite: a crash must leave nothing of the old run to resume or use
            for old in (out / "checkpoint", previous(out / "checkpoint"), out / "adapter"):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return start, train_s


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold out/.lock while a run uses the folder `out` (made if missing): a second run into it is
    refused at once, naming the holder's pid. The lock is the kernel's (flock), so it ends with its
    process: the file a killed run leaves behind is stale and simply taken over. Re-entrant in one
    process (the command line takes it before loading the model, train() again)."""
    key = os.path.realpath(out)
    if key in _LOCKED or fcntl is None:
        yield
        return
    if not out.is_dir():
        out.mkdir(parents=True)
        fsync_dir(out.parent)
    with open(out / LOCK, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise FileExistsError(
                f"{out} is in use by another run (pid {f.read().strip() or '?'}, see {out / LOCK}); wait "
                "for it to end, or choose another out_dir (--out)"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _LOCKED.add(key)
        try:
            yield
        finally:
            _LOCKED.discard(key)


_LOCKED: set[str] = set()  # the run folders this process holds


@contextlib.contextmanager
def _stop_requests():
    """Yields a list that SIGINT (Ctrl-C) and SIGTERM append their number to, instead of stopping the
    process: the loop then ends after the current step with a checkpoint. A second Ctrl-C stops at
    once (KeyboardInterrupt). Only the main thread may set signal handlers; elsewhere nothing changes."""
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def ask(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    old = {s: signal.signal(s, ask) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield asked
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _diverged(what: str, out: Path) -> TrainingDiverged:
    kept = find_checkpoint(out)
    return TrainingDiverged(
        f"{what}; stopped before applying that update. "
        + (f"The last good checkpoint is {kept}. " if kept else "No checkpoint was written yet. ")
        + "Lower the learning rate (or use float32 / bfloat16 instead of float16) and retry."
    )


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
    measured). Returns the final step, loss, eval_loss, train_s (seconds in training steps, eval and
    saving excluded) and the adapter folder. Ctrl-C or SIGTERM ends the run after the current step
    with a checkpoint and raises TrainingInterrupted; an error while writing names the file and the
    cause and leaves the last complete checkpoint to resume from."""
    switch = getattr(model, "gradient_checkpointing", None)
    if config.grad_checkpointing and switch is None:
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing switch")
    out = Path(config.out_dir)
    try:
        if config.grad_checkpointing:
            model.gradient_checkpointing = True
        with run_lock(out) if _world()[0] == 0 else nullcontext(), _stop_requests() as stop:
            return _train(model, tok, train_data, eval_data, config, callback, stop)
    except OSError as e:  # a file that could not be written (a full disk, most often)
        if e.errno is None or e.filename is None:
            raise
        kept = find_checkpoint(out)
        where = f"the last complete checkpoint is {kept}" if kept else "no checkpoint was written yet"
        raise type(e)(e.errno, f"{e.strerror}: {e.filename}; {where} (resume=True, --resume)") from e
    finally:  # the switch goes back to what it was, however the run ends
        if switch is not None:
            model.gradient_checkpointing = switch


def _train(model, tok, train_data, eval_data, config, callback, stop: list[int]) -> dict:
    rank, world = _world()
    out, pad_id, device = Path(config.out_dir), getattr(tok, "pad_id", 0), next(model.parameters()).device
    optimizer, scaler, sampler, total = _setup(model, train_data, config)
    settings = run_settings(model, config, train_data, world)
    start, train_s = _start(out, model, optimizer, scaler, settings, config)
    net = _ddp(model, device) if world > 1 else model
    kw = dict(batch_size=config.eval_batch_size, pad_id=pad_id, dtype=AUTOCAST[config.dtype])
    run_eval = lambda: None if eval_data is None else evaluate(model, eval_data, **kw)
    due = lambda every, done: (every > 0 and done % every == 0) or done == total  # and always at the end
    if start == 0 and eval_data is not None:
        log_metrics(out, {"step": 0, "eval_loss": run_eval()}, callback)

    model.train()
    recent: deque[tuple[float, int]] = deque(maxlen=10)  # (seconds, tokens) of the last 10 steps
    loss, eval_loss, saved_at = float("nan"), None, time.monotonic()
    for step in range(start, total):
        t0 = time.perf_counter()
        lr = lr_at(step, config, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro, n_global, n_tokens = _micro_batches(train_data, sampler.indices(step), config, pad_id)
        try:
            loss = train_step(net, micro, n_global, optimizer, scaler, config)
        except TrainingDiverged as e:
            raise _diverged(f"{e} at step {step + 1}", out) from None
        recent.append((time.perf_counter() - t0, n_tokens))
        train_s, done = train_s + recent[-1][0], step + 1
        eval_loss = run_eval() if due(config.eval_every, done) else None
        if due(config.log_every, done) or eval_loss is not None:
            log_metrics(out, _step_info(done, total, loss, lr, eval_loss, recent, train_s), callback)
        late = config.save_every_minutes > 0 and time.monotonic() - saved_at >= 60 * config.save_every_minutes
        stopping, late = _all_sum([len(stop), late], device)  # every rank stops or saves if one does
        if due(config.save_every, done) or late or stopping:
            save_checkpoint(out, model, optimizer, scaler, done, settings, train_s)
            saved_at = time.monotonic()
        if stopping and done < total:
            raise TrainingInterrupted(stop[0] if stop else signal.SIGTERM, done, out / "checkpoint")

    if rank == 0:  # the final adapter, in peft's format, with the prompt format it learned
        prompt = {"format": train_data.format, "template": train_data.template}
        save_adapter(model, out / "adapter", prompt=prompt)
    _barrier()
    return dict(step=total, loss=loss, eval_loss=eval_loss, train_s=train_s, adapter_dir=str(out / "adapter"))


def _setup(model: nn.Module, train_data: SFTData, config: TrainConfig):
    """(AdamW over the adapter, the float16 grad scaler or None, the step sampler, the step count)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or not any(True for _ in lora_layers(model)):
        raise ValueError(
            "the model has no trainable LoRA parameters; call minilora.inject(model, config) first"
        )
    device = next(model.parameters()).device
    global_batch = config.batch_size * config.grad_accum * _world()[1]
    sampler = StepSampler(train_data.lengths, global_batch, config.seed, config.group_by_length)
    total = config.steps if config.steps is not None else sampler.steps_for_epochs(config.epochs)
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type) if config.dtype == "float16" else None
    return optimizer, scaler, sampler, total


def _step_info(done: int, total: int, loss: float, lr: float, eval_loss, recent, train_s: float) -> dict:
    """A step's metrics line; speed and ETA from the recent steps' (seconds, tokens), eval and saving
    excluded."""
    seconds, tokens = sum(t for t, _ in recent), sum(n for _, n in recent)
    info = {"step": done, "loss": loss, "lr": lr} | ({} if eval_loss is None else {"eval_loss": eval_loss})
    eta_s = (total - done) * seconds / len(recent)
    return info | dict(steps=total, tokens_per_s=tokens / seconds, train_s=train_s, eta_s=eta_s)
