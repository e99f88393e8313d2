"""minilora.loss: the chunked linear cross-entropy equals the unfused one (loss, dh, dW), float64
gradcheck, float32 on tiny Gemma 1, 2 (final soft-cap) and 3 with chunks that do not divide the
token count, and no tensor ever holds more than one chunk of logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import minilora as ml
from minilora import loss as loss_mod
from minilora.gemma import Gemma, GemmaConfig, softcap
from minilora.inject import lora_layers
from minilora.loss import linear_cross_entropy

VOCAB = 97


def reference(h, weight, targets, cap):
    """The unfused loss: every logit in hand."""
    return F.cross_entropy(softcap(h @ weight.T, cap).float(), targets, ignore_index=-100)


def close(got, want, name=""):
    """Within 1e-5 relative, elementwise or to the tensor's scale (a float32 sum's rounding)."""
    atol = 1e-5 * float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def inputs(dtype, N=11, d=6, vocab=VOCAB, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (N,), generator=g)
    targets[[1, 6]] = -100  # ignored rows
    return h, weight, targets


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_gradcheck_float64(cap, weight_trains):
    h, weight, targets = inputs(torch.float64, d=4, vocab=13)
    weight.requires_grad_(weight_trains)
    fn = lambda h, w: linear_cross_entropy(h, w, targets, cap, chunk_size=4)  # 9 labelled rows: 4 + 4 + 1
    assert torch.autograd.gradcheck(fn, (h, weight), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("chunk", [1, 4, 7, 100])
def test_float32_loss_dh_dw_equal_the_unfused_loss(cap, chunk):
    h, weight, targets = inputs(torch.float32, N=23)
    got = linear_cross_entropy(h, weight, targets, cap, chunk_size=chunk)
    dh, dw = torch.autograd.grad(3.0 * got, (h, weight))  # an upstream scale, as train_step's
    want = reference(h, weight, targets, cap)
    dh_ref, dw_ref = torch.autograd.grad(3.0 * want, (h, weight))
    assert got.dtype == torch.float32 and got.ndim == 0
    close(got, want)
    close(dh, dh_ref)
    close(dw, dw_ref)


@pytest.mark.parametrize("shape", [(64,), (1, 1, 64), (2, 3, 64), (300, 64), (2, 200, 64)])
def test_head_product_is_the_linear_product_in_either_layout(shape):
    """The head's product, (W h^T)^T on the CPU: h @ W.T to float32 rounding in the output's shape;
    contiguous=True returns row-major logits (also past 256 rows, where it is h @ W.T itself)."""
    W, h = torch.randn(1000, 64), torch.randn(*shape)
    want = F.linear(h, W)
    for contiguous in (False, True):
        got = loss_mod.head_product(h, W, contiguous)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert got.shape == want.shape and (got.is_contiguous() or not contiguous)
    assert not loss_mod.head_product(torch.randn(8, 64), W).is_contiguous()  # column-major: (W h^T)^T


def test_without_a_label_a_zero_that_backpropagates():
    h, weight, _ = inputs(torch.float32)
    loss = linear_cross_entropy(h, weight, torch.full((11,), -100))
    loss.backward()
    assert loss.item() == 0.0 and h.grad.eq(0).all()


class VocabTensors(TorchDispatchMode):
    """The most rows of any vocabulary-wide tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == VOCAB:
                self.rows = max(self.rows, t.shape[0])
        return out


def test_never_more_than_one_chunk_of_logits(monkeypatch):
    h, weight, targets = inputs(torch.float32, N=40)
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 8 * VOCAB * 6)  # the budget of 6 rows
    with VocabTensors() as seen:
        linear_cross_entropy(h, weight, targets).backward()
    assert seen.rows == 6


# A tiny Gemma of each generation, built from its flags (no transformers needed).
GENERATIONS = {
    "gemma1": dict(num_key_value_heads=1),
    "gemma2": dict(sandwich_norms=True, attn_logit_softcapping=50.0, final_logit_softcapping=2.0,
                   sliding_window=5, sliding_layers=(True, False)),
    "gemma3": dict(sandwich_norms=True, qk_norm=True, sliding_window=5, sliding_layers=(True, False)),
}  # fmt: skip


def tiny_gemma(generation: str) -> Gemma:
    torch.manual_seed(0)
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
    config = GemmaConfig(**{**sizes, **GENERATIONS[generation]})
    model = Gemma(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3 if p.dim() == 2 else 0.1)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B, std=0.1)  # B = 0 would leave A without a gradient
    model.model.embed_tokens.weight.requires_grad_()  # the tied head trains too: dW
    return model


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_tiny_gemma_loss_and_gradients_equal_the_full_logits_path(monkeypatch, generation):
    monkeypatch.setattr(loss_mod, "CHUNK_BYTES", 8 * VOCAB * 4)  # chunks of 4 rows
    model = tiny_gemma(generation)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = -100  # 8 + 12 = 22 labelled positions: not a multiple of 4
    fused = model(ids, labels)
    fused.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(ids)[:, :-1]  # (B, T-1, vocab), soft-capped by the head
    full = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    full.backward()
    close(fused, full)
    assert "model.embed_tokens.weight" in got and len(got) > 1
    for name, p in model.named_parameters():
        if p.requires_grad:
            close(got[name], p.grad, name)
