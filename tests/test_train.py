"""minilora.train on a tiny random Gemma 3: the loss goes down, padding and batch splitting change
nothing, resume reproduces the uninterrupted run exactly, mismatched resumes and NaN losses stop with
clear errors, and two processes under torchrun follow the one-process loss curve.

Exactness of resume: on CPU the resumed process runs the same float32 ops on the same inputs in
the same order from the same restored state (adapter, AdamW moments, RNG), so its metrics are
compared with ==, not a tolerance.
"""

import errno
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import minilora
from minilora.data import collate, pack, tokenize
from minilora.gemma import IGNORE_INDEX, Gemma
from minilora.inject import lora_layers
from minilora.train import TrainConfig, TrainingDiverged, _read_state, evaluate, lr_at, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The stand-in tokenizer and tiny model, also written into the torchrun worker script below.
SETUP = """
import re, torch, minilora
from minilora.gemma import Gemma, GemmaConfig

class CharTokenizer:
    pad_id, eos_id, bos_id, end_of_turn_id = 0, 1, 2, 5
    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [10 + ord(c) % 200 for c in text]

def tiny_model(seed=0, dropout=0.0, targets=["q_proj", "k_proj", "v_proj", "o_proj"]):
    torch.manual_seed(seed)
    config = GemmaConfig(
        vocab_size=224, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sandwich_norms=True, qk_norm=True,
        sliding_window=6, sliding_layers=(True, False),
    )
    model = Gemma(config)
    with torch.no_grad():  # small weights, so the loss starts near log(vocab); the tied head's
        for p in model.parameters():  # rows large enough that the logits can become confident
            if p.dim() == 2:
                p.normal_(std=0.05)
        model.model.embed_tokens.weight.normal_(std=0.3)
    minilora.inject(model, minilora.LoRAConfig(r=4, alpha=8, dropout=dropout, targets=targets))
    return model

def records(n=24, seed=0):
    import random
    r = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = r.randrange(100), r.randrange(100)
        out.append({"prompt": f"{a}+{b}" + "=" * r.randrange(1, 6), "completion": str(a + b)})
    return out
"""
exec(SETUP)  # noqa: S102 - defines CharTokenizer, tiny_model, records here too

TOK = CharTokenizer()  # noqa: F821


def data(n=24, seed=0):
    return tokenize(records(n, seed), TOK)  # noqa: F821


def cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), steps=6, batch_size=4, lr=1e-2, warmup_steps=1, seed=0)
    return TrainConfig(**{**base, **kw})


def checkpoint_state(ckpt):
    """The trainer state of a checkpoint folder (step, train_s, optimizer, scaler)."""
    return _read_state(ckpt / "trainer_state.safetensors")


def metrics(run_dir, keys=("step", "loss", "lr", "eval_loss")):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    return [{k: m[k] for k in keys if k in m} for m in lines]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1, steps=20)
    lrs = [lr_at(s, c, 20) for s in range(22)]
    assert lrs[:4] == [0.2, 0.4, 0.6, 0.8]  # (1) warmup
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:20], lrs[5:20], strict=False))  # (2) cosine
    assert lrs[18] > 0.1 and lrs[19] == pytest.approx(0.1)  # (3) the floor, on step 19: the last that runs
    assert lrs[20] == lrs[21] == pytest.approx(0.1)


def test_padding_does_not_change_an_examples_loss():
    model = tiny_model().eval()  # noqa: F821
    d = data(8)
    long_ex = max(d.examples, key=lambda e: len(e[0]))
    short_ex = min(d.examples, key=lambda e: len(e[0]))
    assert len(long_ex[0]) > len(short_ex[0])
    alone = model(*[t for t in collate([short_ex])][:1], labels=collate([short_ex])[1])
    input_ids, labels = collate([long_ex, short_ex])
    labels[0] = IGNORE_INDEX  # only the padded row counts
    padded = model(input_ids, labels=labels)
    torch.testing.assert_close(padded, alone, rtol=1e-6, atol=1e-6)


def test_packed_rows_give_the_unpacked_loss_and_train(tmp_path):
    d = tokenize(records(24), TOK, max_len=40)  # noqa: F821
    rows = pack(d)
    assert len(rows) < len(d) and max(rows.lengths) <= 40
    model = tiny_model()  # noqa: F821
    input_ids, labels, positions = collate(rows.examples)
    with torch.no_grad():  # the same label tokens, each seen only within its example: the same mean
        packed = model(input_ids, labels, positions=positions)
        torch.testing.assert_close(packed, model(*collate(d.examples)), rtol=1e-5, atol=0)
    train(model, TOK, d, None, cfg(tmp_path, packing=True, batch_size=2, steps=8))
    m = metrics(tmp_path / "run")
    assert m[-1]["loss"] < 0.7 * m[0]["loss"]


def test_evaluate_is_the_token_weighted_mean():
    model = tiny_model()  # noqa: F821
    d = data(10)
    total = count = 0
    for ex in d.examples:
        input_ids, labels = collate([ex])
        n = int((labels[:, 1:] != IGNORE_INDEX).sum())
        total += float(model(input_ids, labels=labels).detach()) * n
        count += n
    assert evaluate(model, d, batch_size=3) == pytest.approx(total / count, rel=1e-6)


def test_loss_goes_down_and_only_the_adapter_changes(tmp_path):
    model = tiny_model(targets="all-linear")  # noqa: F821
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    fixed = data(4)
    result = train(model, TOK, fixed, fixed, cfg(tmp_path, steps=30, warmup_steps=2, lr=3e-2))
    m = metrics(tmp_path / "run")
    assert m[0]["step"] == 0 and "loss" not in m[0]  # held-out loss before training
    assert m[-1]["eval_loss"] < 0.5 * m[0]["eval_loss"]
    assert m[-1]["loss"] < 0.5 * m[1]["loss"]
    assert m[-1]["lr"] == pytest.approx(3e-2 * 0.1)  # the cosine's floor, reached on the last step run
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    # the final adapter is in peft's format and loads back into a fresh model
    fresh = tiny_model(seed=1, targets="all-linear")  # noqa: F821
    minilora.load_adapter(fresh, result["adapter_dir"])
    for (n, a), (_, b) in zip(lora_layers(model), lora_layers(fresh), strict=True):
        assert torch.equal(a.lora_B, b.lora_B), n


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    d = data(16)
    train(tiny_model(), TOK, d, None, cfg(tmp_path / "a", batch_size=8, grad_accum=1))  # noqa: F821
    train(tiny_model(), TOK, d, None, cfg(tmp_path / "b", batch_size=2, grad_accum=4))  # noqa: F821
    a, b = metrics(tmp_path / "a" / "run"), metrics(tmp_path / "b" / "run")
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):  # same global batch: same loss up to summation order
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_gradient_checkpointing_gives_the_same_run(tmp_path):
    d = data(8)
    calls = {}

    def counted(model, key):  # forward calls of the first layer: a pre-hook also sees the recompute
        calls[key] = 0
        model.model.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(key, calls[key] + 1))
        return model

    train(counted(tiny_model(), "plain"), TOK, d, None, cfg(tmp_path / "a", steps=3))  # noqa: F821
    model = counted(tiny_model(), "recomputed")  # noqa: F821
    train(model, TOK, d, None, cfg(tmp_path / "b", steps=3, grad_checkpointing=True))
    assert calls == {"plain": 3, "recomputed": 3 * 2}  # 3 steps of one micro-batch; recomputed in backward
    assert model.gradient_checkpointing is False  # switched back off after the run
    for x, y in zip(metrics(tmp_path / "a" / "run"), metrics(tmp_path / "b" / "run"), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)


def test_bf16_autocast_keeps_float32_adapters(tmp_path):
    model = tiny_model()  # noqa: F821
    train(model, TOK, data(4), None, cfg(tmp_path, steps=2, dtype="bfloat16"))
    assert all(m.lora_A.dtype == torch.float32 for _, m in lora_layers(model))
    assert all(math.isfinite(m["loss"]) for m in metrics(tmp_path / "run"))
    # autocast is really on: the same first step in float32 gives another loss
    train(tiny_model(), TOK, data(4), None, cfg(tmp_path / "f32", steps=1))  # noqa: F821
    bf16, f32 = metrics(tmp_path / "run")[0]["loss"], metrics(tmp_path / "f32" / "run")[0]["loss"]
    assert bf16 != f32 and bf16 == pytest.approx(f32, rel=1e-2)


def test_bf16_base_weights_track_float32_over_20_steps(tmp_path):
    """What dtype="auto" gives on a CPU with fast bf16: base weights in bf16, adapters and AdamW's
    moments float32, bf16 autocast (norms, softmax and the loss accumulate in float32 inside). The
    loss curve follows float32's within 3% relative at every step (measured: 0.5%; bf16 keeps 8
    significant bits, 0.4% per rounding) and ends as low."""
    d = data(8)
    train(tiny_model(), TOK, d, None, cfg(tmp_path / "f32", steps=20, save_every=20))  # noqa: F821
    model = tiny_model()  # noqa: F821
    for name, p in model.named_parameters():  # as from_pretrained(dtype=bf16) + inject leave them
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    train(model, TOK, d, None, cfg(tmp_path / "bf16", steps=20, save_every=20, dtype="bfloat16"))
    f32, bf16 = metrics(tmp_path / "f32" / "run"), metrics(tmp_path / "bf16" / "run")
    assert len(f32) == len(bf16) == 20 and bf16[-1]["loss"] < 0.5 * bf16[0]["loss"]  # it learns
    worst = max(abs(b["loss"] - a["loss"]) / a["loss"] for a, b in zip(f32, bf16, strict=True))
    assert 0 < worst < 3e-2, worst  # 0: bf16 really ran
    assert all(m.lora_A.dtype == m.lora_B.dtype == torch.float32 for _, m in lora_layers(model))
    moments = checkpoint_state(tmp_path / "bf16" / "run" / "checkpoint")["optimizer"]["state"]
    assert {t.dtype for st in moments.values() for k, t in st.items() if k != "step"} == {torch.float32}


def test_float16_with_grad_scaler_runs_and_resumes_exactly(tmp_path):
    d = data(8)
    full = cfg(tmp_path / "full", steps=4, save_every=2, dtype="float16")
    train(tiny_model(), TOK, d, None, full)  # noqa: F821
    m = metrics(tmp_path / "full" / "run")
    assert [x["step"] for x in m] == [1, 2, 3, 4] and all(math.isfinite(x["loss"]) for x in m)
    state = checkpoint_state(tmp_path / "full" / "run" / "checkpoint")
    assert state["scaler"]["scale"] > 0  # the scaler's state is part of the checkpoint

    def stop_at_3(info):
        if info["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        c = cfg(tmp_path / "cut", steps=4, save_every=2, dtype="float16")
        train(tiny_model(), TOK, d, None, c, callback=stop_at_3)  # noqa: F821
    c = cfg(tmp_path / "cut", steps=4, save_every=2, dtype="float16", resume=True)
    train(tiny_model(), TOK, d, None, c)  # noqa: F821
    assert metrics(tmp_path / "cut" / "run") == m


class Interrupt(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    d, ev = data(20), data(6, seed=1)
    # dropout on: the restored RNG state has to be right too
    full = cfg(tmp_path / "full", steps=7, save_every=2, eval_every=3)
    train(tiny_model(dropout=0.1), TOK, d, ev, full)  # noqa: F821

    cut = cfg(tmp_path / "cut", steps=7, save_every=2, eval_every=3)

    def stop_at_5(info):
        if info["step"] == 5:  # step 5 is logged, but the last checkpoint is step 4
            raise Interrupt

    with pytest.raises(Interrupt):
        train(tiny_model(dropout=0.1), TOK, d, ev, cut, callback=stop_at_5)  # noqa: F821
    assert metrics(tmp_path / "cut" / "run")[-1]["step"] == 5
    # a fresh process: the same base weights, a new adapter init and RNG; the checkpoint restores them
    model = tiny_model(dropout=0.1)  # noqa: F821
    torch.manual_seed(3)
    for _, m in lora_layers(model):
        m.reset_lora_parameters()
    train(model, TOK, d, ev, cfg(tmp_path / "cut", steps=7, save_every=2, eval_every=3, resume=True))
    assert metrics(tmp_path / "cut" / "run") == metrics(tmp_path / "full" / "run")
    assert [m["step"] for m in metrics(tmp_path / "full" / "run")] == list(range(8))
    # training seconds go on from the checkpoint's (step 4's) count
    seconds = [m["train_s"] for m in metrics(tmp_path / "cut" / "run", keys=("train_s",)) if m]
    assert len(seconds) == 7 and seconds == sorted(seconds)
    a, b = (tmp_path / d / "run" / "adapter" / "adapter_model.safetensors" for d in ("full", "cut"))
    assert a.read_bytes() == b.read_bytes()


def test_resume_from_the_old_checkpoint_after_a_crash_between_the_renames(tmp_path):
    d = data(12)
    train(tiny_model(), TOK, d, None, cfg(tmp_path / "full", steps=4, save_every=2))  # noqa: F821

    def stop_at_3(info):
        if info["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        c = cfg(tmp_path / "cut", steps=4, save_every=2)
        train(tiny_model(), TOK, d, None, c, callback=stop_at_3)  # noqa: F821
    # as a crash in save_checkpoint leaves it: the step-2 checkpoint moved aside, a half-written new one
    run = tmp_path / "cut" / "run"
    (run / "checkpoint").rename(run / ".checkpoint.old")
    (run / ".checkpoint.tmp").mkdir()
    train(tiny_model(), TOK, d, None, cfg(tmp_path / "cut", steps=4, save_every=2, resume=True))  # noqa: F821
    assert metrics(run) == metrics(tmp_path / "full" / "run")
    assert sorted(p.name for p in run.iterdir()) == [".lock", "adapter", "checkpoint", "metrics.jsonl"]


def test_resume_refuses_other_settings_and_fresh_runs_refuse_to_clobber(tmp_path):
    d = data(8)
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    with pytest.raises(ValueError, match=r"other settings[\s\S]*lr: checkpoint 0.01, this run 0.02"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, lr=2e-2, resume=True))  # noqa: F821
    with pytest.raises(ValueError, match=r"data: checkpoint"):
        train(tiny_model(), TOK, data(9), None, cfg(tmp_path, steps=2, resume=True))  # noqa: F821
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=1, overwrite=True))  # noqa: F821
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1]  # the old run's lines are gone
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path / "new", steps=2, resume=True))  # noqa: F821
    with pytest.raises(ValueError, match="inject"):
        train(Gemma(tiny_model().config), TOK, d, None, cfg(tmp_path / "x"))  # noqa: F821


def test_resume_refuses_other_base_weights(tmp_path):
    d = data(8)
    train(tiny_model(seed=0), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    other = tiny_model(seed=1)  # noqa: F821 - the same architecture and config, other weights
    with pytest.raises(ValueError, match=r"other settings[\s\S]*trained on other base weights"):
        train(other, TOK, d, None, cfg(tmp_path, steps=2, resume=True))


def test_resume_may_toggle_gradient_checkpointing(tmp_path):
    # The usual reason: the run ran out of memory. Recomputation gives the same numbers, dropout included.
    d = data(12)
    train(tiny_model(dropout=0.1), TOK, d, None, cfg(tmp_path / "full", steps=4, save_every=2))  # noqa: F821

    def stop_at_3(info):
        if info["step"] == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        c = cfg(tmp_path / "cut", steps=4, save_every=2)
        train(tiny_model(dropout=0.1), TOK, d, None, c, callback=stop_at_3)  # noqa: F821
    c = cfg(tmp_path / "cut", steps=4, save_every=2, resume=True, grad_checkpointing=True)
    train(tiny_model(dropout=0.1), TOK, d, None, c)  # noqa: F821
    assert metrics(tmp_path / "cut" / "run") == metrics(tmp_path / "full" / "run")


def test_resume_after_a_half_written_metrics_line(tmp_path, caplog):
    d = data(8)
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, save_every=1))  # noqa: F821
    path = tmp_path / "run" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 6.1')  # killed while appending
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, save_every=1, resume=True))  # noqa: F821
    assert [m["step"] for m in metrics(tmp_path / "run")] == [1, 2]
    assert "half-written last line" in caplog.text
    # a damaged line that is not the last is not guessed at: the error names the file, line and fix
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0][:-3], *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not a metrics line .* delete that line"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, resume=True))  # noqa: F821


def test_overwrite_removes_the_old_run_up_front(tmp_path):
    d = data(8)
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    assert (tmp_path / "run" / "adapter").is_dir()

    def die(info):
        raise Interrupt

    with pytest.raises(Interrupt):  # the new run dies before its first save
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, overwrite=True), callback=die)  # noqa: F821
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", "metrics.jsonl"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()  # noqa: F821
    layer = next(m for _, m in lora_layers(model))

    def poison(info):
        if info["step"] == 3:  # after the step-2 checkpoint
            with torch.no_grad():
                layer.lora_B.fill_(float("nan"))

    with pytest.raises(
        TrainingDiverged, match=r"loss is nan at step 4[\s\S]*last good checkpoint .*checkpoint"
    ):
        train(model, TOK, data(8), None, cfg(tmp_path, steps=6, save_every=2), callback=poison)
    state = checkpoint_state(tmp_path / "run" / "checkpoint")
    assert state["step"] == 2
    kept = minilora.read_adapter(tmp_path / "run" / "checkpoint")[1]
    assert all(torch.isfinite(t).all() for pair in kept.values() for t in pair.values())


def test_non_finite_gradient_stops_before_the_update_and_keeps_a_good_checkpoint(tmp_path):
    # A finite loss whose backward overflows: the update must not reach the adapter or a checkpoint.
    model = tiny_model()  # noqa: F821
    layer = next(m for _, m in lora_layers(model))
    bad = {"on": False}
    layer.lora_B.register_hook(lambda g: g * float("inf") if bad["on"] else g)

    def overflow_from_step_2(info):
        bad["on"] = info["step"] >= 1

    for grad_clip in (1.0, 0.0):  # the norm is checked with clipping off too
        out = tmp_path / f"clip{grad_clip}"
        bad["on"] = False
        c = cfg(out, steps=6, save_every=1, grad_clip=grad_clip)
        with pytest.raises(TrainingDiverged, match=r"gradient norm is (inf|nan) at step 2[\s\S]*last good"):
            train(model, TOK, data(8), None, c, callback=overflow_from_step_2)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        kept = minilora.read_adapter(out / "run" / "checkpoint")[1]
        assert all(torch.isfinite(t).all() for pair in kept.values() for t in pair.values())
        assert checkpoint_state(out / "run" / "checkpoint")["step"] == 1


WORKER = (
    SETUP
    + """
import json, sys, torch.distributed as dist
from minilora.data import tokenize
from minilora.train import TrainConfig, train
dist.init_process_group("gloo")
out = sys.argv[1]
model = tiny_model()
d = tokenize(records(16), CharTokenizer())
train(model, CharTokenizer(), d, tokenize(records(6, seed=1), CharTokenizer()),
      TrainConfig(out_dir=out, steps=4, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1, eval_every=2))
dist.destroy_process_group()
"""
)


def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0"]
    cmd += ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", str(script), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # each process accumulates 2 micro-batches of 2 (DDP's no_sync on the first); one process, the same
    # global batch of 8 = 4 micro-batches of 2
    one = cfg(tmp_path / "one", steps=4, batch_size=2, grad_accum=4, eval_every=2)
    train(tiny_model(), TOK, data(16), tokenize(records(6, seed=1), TOK), one)  # noqa: F821
    a, b = metrics(tmp_path / "ddp"), metrics(tmp_path / "one" / "run")
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):  # float32 sums in another order: agree to ~1e-6 relative
        for key in ("loss", "lr", "eval_loss"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x, y)
    assert os.path.isfile(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    assert not re.search(r"Traceback", proc.stderr)


@pytest.mark.slow
def test_train_gemma_example_on_the_real_model(tmp_path):
    """examples/train_gemma.py on the real Gemma 3 270M for 2 steps, by default on its Q4_K_M GGUF file
    (kept quantized): metrics.jsonl, the before/after
    lines, an adapter that peft loads onto the transformers model (read from the float32 folder) with
    minilora's logits, and adapter.gguf for llama.cpp with the command that serves it."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minilora.gemma import from_pretrained
    from minilora.gguf import default_model_dir

    path = default_model_dir()
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "examples", "train_gemma.py"),
        "--steps",
        "2",
        "--batch-size",
        "4",
    ]
    # a packed model dequantizes every weight per forward: 8 held-out examples, not the bundled 60
    eval_data = tmp_path / "eval.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "dates_eval.jsonl"), encoding="utf-8") as f:
        eval_data.write_text("".join(f.readlines()[:8]), encoding="utf-8")
    cmd += ["--eval-data", str(eval_data), "--eval-examples", "2", "--max-new-tokens", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in ("held-out exact match before:", "after:", "held-out loss before:", "sample after:",
                 f"--lora {out / 'adapter.gguf'}"):  # fmt: skip
        assert line in proc.stdout, proc.stdout
    assert "q4_k_m.gguf (torch.float32" in proc.stdout  # the GGUF file, kept quantized
    gguf = pytest.importorskip("gguf")
    assert len(gguf.GGUFReader(str(out / "adapter.gguf")).tensors) == 2 * 72  # A, B of q/k/v/o x 18 layers
    m = metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2] and "eval_loss" in m[0] and "eval_loss" in m[-1]
    assert all(math.isfinite(x["loss"]) for x in m[1:])

    from minilora.tokenizer import Tokenizer

    ids = torch.tensor([Tokenizer(path).encode("Date 2039-02-10 in words: the 10th of")])  # (1, T)
    ours = from_pretrained(path, dtype=torch.float32)
    minilora.load_adapter(ours, out / "adapter")
    assert any(m.lora_B.abs().sum() > 0 for _, m in lora_layers(ours))  # trained: B moved off zero
    with torch.no_grad():
        expected = ours(ids)
    del ours
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, out / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# ---- issue 9: nothing run from a run folder, nothing lost on Ctrl-C, a full disk or a second run


class Payload:
    """Unpickling this creates the file `marker`: the proof that a pickle was run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_crafted_pickle_in_the_run_folder_is_never_run(tmp_path):
    d, marker = data(8), tmp_path / "pwned"
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    ckpt = tmp_path / "run" / "checkpoint"
    for name in ("trainer_state.pt", "rng_rank0.pt"):  # the files older minilora unpickled
        torch.save(Payload(marker), ckpt / name)
    with pytest.raises(ValueError, match=r"checkpoint/rng_rank0.pt is not listed in manifest.json"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, resume=True))  # noqa: F821
    (ckpt / "manifest.json").unlink()  # a run folder of the old layout: refused, not unpickled
    with pytest.raises(ValueError, match=r"older minilora, in pickle files .* unpickling can run code"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, resume=True))  # noqa: F821
    assert not marker.exists()


@pytest.mark.parametrize(
    "name", ["trainer_state.safetensors", "adapter_model.safetensors", "rng_rank0.safetensors"]
)
def test_a_flipped_byte_in_a_checkpoint_is_named(tmp_path, name):
    d = data(8)
    train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2))  # noqa: F821
    path = tmp_path / "run" / "checkpoint" / name
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"checkpoint/{name} differs from its sha256 in manifest.json"):
        train(tiny_model(), TOK, d, None, cfg(tmp_path, steps=2, resume=True))  # noqa: F821


def test_every_rename_has_its_source_fsynced_before_and_its_folder_after(tmp_path, monkeypatch):
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))  # fmt: skip
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("rename", str(a), str(b))), real_replace(a, b))
    )
    train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=2, save_every=1))  # noqa: F821
    renames = [(i, e) for i, e in enumerate(events) if e[0] == "rename" and not e[2].endswith(".old")]
    assert len(renames) > 10
    for i, (_, src, dst) in renames:
        assert ("fsync", src) in events[:i], src  # the file or folder is on disk under its temp name
        assert ("fsync", os.path.dirname(dst)) in events[i:], dst  # and the rename itself
    assert ("fsync", str(tmp_path)) in events  # the run folder's own entry


def test_ctrl_c_and_sigterm_finish_the_step_write_a_checkpoint_and_stop(tmp_path):
    from minilora.train import TrainingInterrupted

    d = data(12)
    train(tiny_model(dropout=0.1), TOK, d, None, cfg(tmp_path / "full", steps=5))  # noqa: F821
    handler = signal.getsignal(signal.SIGINT)
    for signum in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / signum.name
        kill = lambda info, signum=signum: info["step"] == 2 and os.kill(os.getpid(), signum)
        with pytest.raises(TrainingInterrupted, match=rf"stopped by {signum.name} after step 2") as e:
            train(tiny_model(dropout=0.1), TOK, d, None, cfg(out, steps=5), callback=kill)  # noqa: F821
        assert e.value.step == 2 and checkpoint_state(out / "run" / "checkpoint")["step"] == 2
        assert signal.getsignal(signal.SIGINT) is handler  # the handlers are put back
        train(tiny_model(dropout=0.1), TOK, d, None, cfg(out, steps=5, resume=True))  # noqa: F821
        assert metrics(out / "run") == metrics(tmp_path / "full" / "run")
    twice = lambda info: info["step"] == 2 and [os.kill(os.getpid(), signal.SIGINT) for _ in range(2)]
    with pytest.raises(KeyboardInterrupt) as e:  # a second Ctrl-C stops at once
        train(tiny_model(), TOK, d, None, cfg(tmp_path / "twice", steps=5), callback=twice)  # noqa: F821
    assert not isinstance(e.value, TrainingInterrupted)


def test_checkpoints_by_wall_time(tmp_path, monkeypatch):
    import minilora.train as train_mod

    clock = itertools.count(0, 50)  # each look at the clock: 50 s later
    monkeypatch.setattr(train_mod.time, "monotonic", lambda: next(clock))
    seen = []
    look = lambda info: (
        seen.append(checkpoint_state(tmp_path / "run" / "checkpoint")["step"]) if info["step"] > 2 else None
    )
    train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=6, save_every_minutes=1.5), callback=look)  # noqa: F821
    assert seen == [2, 2, 4, 4]  # a checkpoint each 2 steps (100 s), none by step count


def test_a_second_run_into_the_same_folder_is_refused_at_once(tmp_path):
    # issue 9 (4): two runs with one out_dir interleaved metrics.jsonl and deleted each other's files
    out = tmp_path / "run"
    code = "import sys, pathlib; from minilora.train import run_lock\n"
    code += "with run_lock(pathlib.Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(FileExistsError, match=rf"{out} is in use by another run \(pid {holder.pid}"):
            train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=2))  # noqa: F821
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing touched
    finally:
        holder.kill()  # a dead process's lock is stale: the next run takes it over
        holder.wait()
    train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=2))  # noqa: F821
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(
    "field, value, valid",
    [("lr", 0, "a number > 0"), ("lr", -1e-3, "a number > 0"), ("epochs", 0, "a number > 0"),
     ("epochs", -1.0, "a number > 0"), ("eval_every", -1, "an integer >= 0"),
     ("warmup_steps", -5, "an integer >= 0"), ("steps", 2.5, "an integer >= 1"),
     ("batch_size", 0, "an integer >= 1"),
     ("lr", float("nan"), "a number > 0"), ("save_every_minutes", -1, "a number >= 0"),
     ("beta2", 1.5, r"in \[0, 1\]")],
)  # fmt: skip
def test_train_config_values_are_checked(field, value, valid):
    with pytest.raises(ValueError, match=rf"TrainConfig.{field} must be {valid}, got"):
        TrainConfig(**{field: value})


def test_a_failed_checkpoint_write_names_the_file_and_what_resumes(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real_save, calls = safetensors.torch.save_file, []

    def disk_full_at_the_second_checkpoint(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) > 3:  # the first checkpoint's 3 safetensors files were written
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_at_the_second_checkpoint)
    with pytest.raises(
        OSError,
        match=r"No space left on device: .*\.safetensors; the last complete checkpoint is .*checkpoint",
    ) as e:
        train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=4, save_every=2))  # noqa: F821
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=4, save_every=2, resume=True))  # noqa: F821
    train(tiny_model(), TOK, data(8), None, cfg(tmp_path / "full", steps=4, save_every=2))  # noqa: F821
    assert metrics(tmp_path / "run") == metrics(tmp_path / "full" / "run")


def test_the_adapter_records_its_prompt_format(tmp_path):
    result = train(tiny_model(), TOK, data(8), None, cfg(tmp_path, steps=1))  # noqa: F821
    assert minilora.adapter.read_prompt(result["adapter_dir"]) == {
        "format": "prompt_completion",
        "template": None,
    }
