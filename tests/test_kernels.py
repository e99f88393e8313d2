"""The fused Triton LoRA op (kernels/lora_linear.py) against plain PyTorch.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small; the same tests run compiled on a GPU. The reference is the LoRA equation in
float64 on the very same input values, and the tolerance is derived per element, not guessed:

    |kernel - exact| <= 2 * (2 u + n 2^-24) * mag

where mag is the same computation on absolute values (|x| @ |W|.T + ...; for a gradient, the same
backward with |dy|), n the longest reduction (M, K, N or r: fp32 accumulation costs n * 2^-24 * mag,
Higham's gamma_n), u the unit roundoff of the dtype: every result passes through at most two
roundings to it (the rank-r intermediate xa or dyb, rounded before its second product as PyTorch's
bf16 LoRA does, and the output). The leading 2 is headroom. u = 2^-24 (float32), 2^-8 (bfloat16,
8 significant bits), 2^-11 (float16).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from minilora.kernels import LoRALinearFunction, dropout_mask, lora_linear
from torch import nn

import minilora
from minilora.gemma import Gemma, GemmaConfig

DEV = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(lead, K, N, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(DEV, dtype)
    x = rand(*lead, K)
    W = rand(N, K) / math.sqrt(K)
    b = rand(N) if bias else None
    A = rand(r, K) / math.sqrt(K)
    B = rand(N, r)  # not zero (its init), so the low-rank path is exercised
    dy = rand(*lead, N)
    return x, W, b, A, B, dy


def run_kernel(x, W, b, A, B, s, dy, p=0.0, seed=None, fuse_shrink=None):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = lora_linear(x, W, b, A, B, s, p, p > 0, seed=seed, fuse_shrink=fuse_shrink)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad


def reference(x, W, b, A, B, s, dy, keep=None, p=0.0, absolute=False):
    """y, dx, dA, dB of the LoRA equation in float64 (on |inputs| with absolute=True: the magnitudes)."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    x, A, B = (f(t).requires_grad_() for t in (x, A, B))
    h = x if keep is None else x * keep.view(x.shape).double() / (1 - p)
    y = F.linear(x, f(W), None if b is None else f(b)) + s * F.linear(F.linear(h, A), B)
    y.backward(f(dy))
    return y.detach(), x.grad, A.grad, B.grad


def assert_close_derived(got, x, W, b, A, B, s, dy, keep=None, p=0.0, u=None):
    exact = reference(x, W, b, A, B, s, dy, keep, p)
    mag = reference(x, W, b, A, B, s, dy, keep, p, absolute=True)
    n = max(x.shape[-1], W.shape[0], x.numel() // x.shape[-1], A.shape[0])
    u = UNIT_ROUNDOFF[x.dtype] if u is None else u
    for name, g, e, m in zip(("y", "dx", "dA", "dB"), got, exact, mag, strict=True):
        assert g.dtype == x.dtype and g.shape == e.shape, name
        tol = 2 * (2 * u + n * 2.0**-24) * m + 1e-30
        err = (g.double() - e).abs()
        worst = (err / tol).max().item()
        assert worst <= 1.0, f"{name}: error {err.max().item():.3g} is {worst:.2f}x the derived bound"


CASES = [  # (leading dims, in K, out N, bias): none of M, K, N a multiple of a tile
    ((37,), 45, 29, True),
    ((2, 7), 33, 70, False),
    ((1,), 17, 5, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [1, 5, 16, 64, 100])  # R_PAD 16, 16, 16, 64, 128
@pytest.mark.parametrize("lead,K,N,bias", CASES)
def test_output_and_gradients_match_reference(lead, K, N, bias, r, dtype):
    x, W, b, A, B, dy = make_inputs(lead, K, N, r, dtype, bias)
    s = 16 / r
    got = run_kernel(x, W, b, A, B, s, dy)
    assert got[0].shape == (*lead, N)
    assert_close_derived(got, x, W, b, A, B, s, dy)


@pytest.mark.parametrize("fuse_shrink", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,K,N,bias", CASES)
def test_shrink_in_gemm_loop_or_separate(lead, K, N, bias, dtype, fuse_shrink):
    # x @ A.T and dy @ B computed inside the GEMM's K loop, or by the separate shrink kernel
    x, W, b, A, B, dy = make_inputs(lead, K, N, 5, dtype, bias)
    got = run_kernel(x, W, b, A, B, 3.2, dy, fuse_shrink=fuse_shrink)
    assert_close_derived(got, x, W, b, A, B, 3.2, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_between_64_and_128_with_the_separate_shrink(dtype):
    # R_PAD = 128, the largest tiles: the shrink kernel's (BLOCK_M, 128) accumulator, the GEMM's epilogue
    x, W, b, A, B, dy = make_inputs((2, 7), 33, 70, 100, dtype, bias=True)
    got = run_kernel(x, W, b, A, B, 0.16, dy, fuse_shrink=False)
    assert_close_derived(got, x, W, b, A, B, 0.16, dy)


def test_rank_above_max_rank_uses_plain_gemms_with_the_same_mask():
    x, W, b, A, B, dy = make_inputs((12,), 20, 10, 130, torch.float32)
    keep = dropout_mask(4, (12, 20), 0.25, device=DEV)
    got = run_kernel(x, W, b, A, B, 0.5, dy, p=0.25, seed=4)
    assert_close_derived(got, x, W, b, A, B, 0.5, dy, keep=keep, p=0.25)


def test_non_contiguous_inputs_bias_and_grad_output():
    x, W, b, A, B, _ = make_inputs((40,), 11, 24, 5, torch.float32)
    x = torch.randn(40, 11, 3, device=DEV).permute(2, 1, 0)  # (3, 11, 40), not contiguous
    W = torch.randn(40, 24, device=DEV).t()  # (24, 40) transposed view
    b = torch.randn(48, device=DEV)[::2]  # every other element
    A = torch.randn(5, 40, device=DEV)
    dy = torch.randn(24, 11, 3, device=DEV).permute(2, 1, 0)  # (3, 11, 24)
    assert not (x.is_contiguous() or W.is_contiguous() or b.is_contiguous() or dy.is_contiguous())
    got = run_kernel(x, W, b, A, B, 0.5, dy)
    assert_close_derived(got, x, W, b, A, B, 0.5, dy)


@pytest.mark.parametrize("p,fuse_shrink", [(0.0, None), (0.5, None), (0.0, False)])
def test_gradcheck_float64(p, fuse_shrink):
    # float64 runs the kernels' FMA path (no fp64 tl.dot); s and 1/(1-p) are exact in the kernels'
    # float32 scalars. A fixed seed makes the dropout mask part of a deterministic function.
    x, W, b, A, B, _ = make_inputs((1, 3), 5, 4, 2, torch.float64)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    fn = lambda x, A, B: lora_linear(x, W, b, A, B, 0.5, p, True, seed=11, fuse_shrink=fuse_shrink)
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=1e-8)


def test_autotune_pruning_keeps_only_configs_that_fit(monkeypatch):
    # the autotuner's early_config_prune hook, as Triton calls it (no GPU needed: the limit is patched)
    L = sys.modules[LoRALinearFunction.__module__]
    monkeypatch.setattr(L, "_smem_limit", lambda device: L._SMEM_H100)
    configs = [L._config(*c) for c in L._MM_CONFIGS]
    x = torch.empty(0, dtype=torch.float32)
    x_on_gpu = type("FakeTensor", (), dict(device=torch.device("cuda", 0), element_size=x.element_size))()
    kept = lambda **meta: [str(c) for c in L._prune_by_smem(configs, dict(x_ptr=x_on_gpu), **meta)]
    assert len(kept(R_PAD=16, FUSE_SHRINK=False)) == 4  # float32 tiles are twice as big as bf16's
    # float32 (TF32) with the in-loop shrink at R_PAD 64 or 128: only the small fallback fits
    assert kept(R_PAD=128, FUSE_SHRINK=True) == kept(R_PAD=64, FUSE_SHRINK=True) == [str(configs[-1])]
    x_on_gpu.element_size = lambda: 2  # bf16: every config fits
    assert len(kept(R_PAD=128, FUSE_SHRINK=True)) == len(configs)


@pytest.mark.parametrize("api", ["allow_tf32", "fp32_precision"])
def test_tf32_is_read_through_either_torch_api(api):
    # torch >= 2.9 raises on reading the legacy allow_tf32 once the new fp32_precision API was used.
    # Set and restored by hand: under pytest >= 9 monkeypatch cannot undo a setattr on this module
    # (its __setattr__ is dynamic), which left TF32 on for the rest of the session.
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, api):
        pytest.skip(f"this torch has no torch.backends.cuda.matmul.{api}")
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else None
    legacy_before = None if before is not None else matmul.allow_tf32
    try:
        setattr(matmul, api, True if api == "allow_tf32" else "tf32")
        kernel_module = sys.modules[LoRALinearFunction.__module__]
        assert kernel_module._common_meta(torch.float32, False)["PRECISION"] == "tf32"
        # float32 on the tensor cores, in-loop shrink at R_PAD = 128: on a GPU, the autotuned configs
        # whose tiles do not fit in shared memory are pruned (none of the tutorial's big tiles fits)
        x, W, b, A, B, dy = make_inputs((100,), 64, 96, 100, torch.float32)
        got = run_kernel(x, W, b, A, B, 0.16, dy, fuse_shrink=True)
        assert_close_derived(got, x, W, b, A, B, 0.16, dy, u=2.0**-11)  # TF32 keeps 11 significant bits
    finally:
        if before is not None:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = legacy_before
    assert kernel_module._common_meta(torch.float32, False)["PRECISION"] == "ieee"


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize("fuse_shrink", [None, False])
def test_dropout_mask_is_regenerated_in_backward(fuse_shrink):
    lead, K, N, r, p, seed = (2, 9), 40, 24, 5, 0.3, 1234
    x, W, b, A, B, dy = make_inputs(lead, K, N, r, torch.float32)
    keep = dropout_mask(seed, (18, K), p, device=DEV)
    assert 0 < keep.sum() < keep.numel()
    got = run_kernel(x, W, b, A, B, 2.0, dy, p=p, seed=seed, fuse_shrink=fuse_shrink)
    assert_close_derived(got, x, W, b, A, B, 2.0, dy, keep=keep, p=p)
    # and a different mask would not pass: the dropout changes every result
    undropped = reference(x, W, b, A, B, 2.0, dy)
    for g, e in zip(got, undropped, strict=True):
        assert not torch.allclose(g.double(), e, rtol=1e-3, atol=1e-3)


def test_dropout_off_is_an_exact_no_op():
    x, W, b, A, B, dy = make_inputs((6,), 20, 12, 4, torch.float32)
    plain = run_kernel(x, W, b, A, B, 2.0, dy)
    for p, training in [(0.3, False), (0.0, True)]:
        xx, AA, BB = (t.clone().requires_grad_() for t in (x, A, B))
        y = lora_linear(xx, W, b, AA, BB, 2.0, p, training)
        y.backward(dy)
        for g, e in zip((y, xx.grad, AA.grad, BB.grad), plain, strict=True):
            assert torch.equal(g, e)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    keep = dropout_mask(7, (64, 256), p, device=DEV).double()
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    assert torch.equal(keep, dropout_mask(7, (64, 256), p, device=DEV).double())
    assert not torch.equal(keep, dropout_mask(8, (64, 256), p, device=DEV).double())


def test_dropout_seed_follows_torch_manual_seed():
    x, W, b, A, B, _ = make_inputs((8,), 16, 16, 4, torch.float32)
    run = lambda: lora_linear(x, W, b, A, B, 1.0, 0.5, True)
    torch.manual_seed(3)
    y1 = run()
    torch.manual_seed(3)
    assert torch.equal(run(), y1)
    assert not torch.equal(run(), y1)


# ---------------------------------------------------------------------------------------------
# The wrapper's checks


def test_empty_input():
    x, W, b, A, B, _ = make_inputs((2, 0), 8, 6, 2, torch.float32)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    y = lora_linear(x, W, b, A, B, 1.0)
    assert y.shape == (2, 0, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(A=torch.zeros(4, 9)), ValueError, r"lora_A must be \(r, in=8\)"),
        (dict(B=torch.zeros(6, 3)), ValueError, r"lora_B must be \(out=6, r=4\)"),
        (dict(x=torch.zeros(3, 9)), ValueError, "x has 9 features"),
        (dict(A=torch.zeros(4, 8, dtype=torch.float64)), TypeError, "lora_A is torch.float64 but x is"),
        (dict(A=torch.zeros(0, 8), B=torch.zeros(6, 0)), ValueError, "rank r must be >= 1"),
        (dict(W=torch.zeros(6, 8, requires_grad=True)), ValueError, "frozen"),
        (dict(p=1.0), ValueError, "dropout_p"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = dict(x=torch.zeros(3, 8), W=torch.zeros(6, 8), A=torch.zeros(4, 8), B=torch.zeros(6, 4), p=0.0)
    args.update(change)
    args = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        lora_linear(args["x"], args["W"], None, args["A"], args["B"], 1.0, args["p"], True)


# ---------------------------------------------------------------------------------------------
# LoRALinear and the backend switch


def lora_layer(in_f, out_f, r, dropout=0.0, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = minilora.LoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=2 * r, dropout=dropout)
    nn.init.normal_(layer.lora_B)  # trained-looking B, so the LoRA term is not zero
    return layer.to(DEV)


def forward_backward(layer, x):
    x = x.clone().requires_grad_()
    layer.zero_grad()
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def test_lora_linear_triton_backend_matches_torch_backend():
    layer = lora_layer(40, 24, 4, dropout=0.1).eval()  # eval: dropout off, so both paths are exact
    x = torch.randn(2, 5, 40, device=DEV)
    before = minilora.get_backend()
    try:
        minilora.set_backend("torch")
        expected = forward_backward(layer, x)
        minilora.set_backend("triton")
        calls = []
        orig = LoRALinearFunction.apply
        LoRALinearFunction.apply = lambda *a: calls.append(1) or orig(*a)
        try:
            got = forward_backward(layer, x)
        finally:
            LoRALinearFunction.apply = orig
    finally:
        minilora.set_backend(before)
    assert calls, "the triton backend did not reach the fused op"
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def count_fused_calls(monkeypatch) -> list:
    calls, orig = [], LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    return calls


def test_autocast_through_the_fused_path(monkeypatch):
    # what train.py does on a GPU: float32 layer and adapters, bf16 autocast, the fused backend
    layer = lora_layer(40, 24, 4)
    x = torch.randn(2, 6, 40, device=DEV)
    results = {}
    before = minilora.get_backend()
    try:
        for backend in ("torch", "triton"):
            minilora.set_backend(backend)
            calls = count_fused_calls(monkeypatch)
            with torch.autocast(DEV, dtype=torch.bfloat16):
                results[backend] = forward_backward(layer, x)
            assert bool(calls) == (backend == "triton")
    finally:
        minilora.set_backend(before)
    (y, dx, dA, dB), plain = results["triton"], results["torch"]
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.float32  # x is float32, so is its gradient
    assert dA.dtype == dB.dtype == torch.float32  # float32 adapters get float32 gradients
    for name, got, expected in zip(("y", "dx", "dA", "dB"), results["triton"], plain, strict=True):
        rel = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
        assert rel < 2e-2, (name, rel)  # both round every operand to bf16 (8 bits): ~2^-8 apart


def test_activation_checkpointing_replays_the_dropout_mask(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    layer = lora_layer(40, 24, 4, dropout=0.3).train()
    x = torch.randn(2, 6, 40, device=DEV)

    def run(use_checkpoint):
        torch.manual_seed(5)
        xx = x.clone().requires_grad_()
        layer.zero_grad()
        y = checkpoint(layer, xx, use_reentrant=False) if use_checkpoint else layer(xx)
        y.square().sum().backward()
        return y.detach(), xx.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone()

    before = minilora.get_backend()
    try:
        minilora.set_backend("triton")
        calls = count_fused_calls(monkeypatch)
        plain, recomputed = run(False), run(True)
    finally:
        minilora.set_backend(before)
    assert len(calls) == 3  # forward, checkpointed forward, its recomputation in backward
    for name, a, b in zip(("y", "dx", "dA", "dB"), plain, recomputed, strict=True):
        assert torch.equal(a, b), name  # the same seed, so the same mask, bit for bit
    with torch.no_grad():
        assert not torch.equal(layer.eval()(x), plain[0])  # and dropout did drop something


@pytest.mark.gpu
@requires_gpu
def test_auto_backend_uses_fused_path_on_cuda(monkeypatch):
    layer = lora_layer(64, 32, 8).cuda()
    calls = []
    orig = LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    before = minilora.get_backend()
    try:
        minilora.set_backend("auto")
        layer(torch.randn(4, 64, device="cuda")).sum().backward()
    finally:
        minilora.set_backend(before)
    assert calls and layer.lora_A.grad is not None


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# p = 0 lets the forward take the in-loop shrink (r = 8, N <= 1152); r = 100 has the largest tiles
@pytest.mark.parametrize("r,p", [(8, 0.0), (100, 0.1)])
@pytest.mark.parametrize("M,K,N", [(512, 1152, 1024), (300, 1024, 6912), (1000, 6912, 1152)])
def test_gemma_shapes_on_gpu(M, K, N, r, p, dtype):
    # realistic sizes: autotuned tile configs, several column tiles, split reductions for dA/dB (each
    # new specialisation compiles up to 6 configs: this matrix is kept small for the GPU's time budget)
    x, W, b, A, B, dy = make_inputs((M,), K, N, r, dtype, bias=False)
    got = run_kernel(x, W, b, A, B, 2.0, dy, p=p, seed=5)
    keep = dropout_mask(5, (M, K), p) if p > 0 else None
    assert_close_derived(got, x, W, b, A, B, 2.0, dy, keep=keep, p=p)


def tiny_gemma_with_lora(device, dtype):
    """A 2-layer Gemma 3 (sliding + full attention, GQA, qk-norm) with LoRA on all seven projections."""
    torch.manual_seed(0)
    cfg = GemmaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sandwich_norms=True, qk_norm=True,
        sliding_window=8, sliding_layers=(True, False),
    )  # fmt: skip
    model = Gemma(cfg)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    minilora.inject(model, minilora.LoRAConfig(r=8, alpha=16, targets=targets))
    for mod in model.modules():
        if isinstance(mod, minilora.LoRALinear):
            nn.init.normal_(mod.lora_B, std=0.02)
    return model.to(device, dtype)


def run_backend(model, ids, backend):
    """Logits and every LoRA gradient (float32 copies) of one forward/backward on `backend`."""
    before = minilora.get_backend()
    try:
        minilora.set_backend(backend)
        model.zero_grad()
        logits = model(ids)  # (2, 12, 96) float32
        logits.square().mean().backward()
    finally:
        minilora.set_backend(before)
    return [logits.detach()] + [p.grad.float().clone() for n, p in model.named_parameters() if "lora_" in n]


def gemma_fused_vs_pytorch(device, dtype):
    """A tiny Gemma's logits and LoRA gradients, fused op vs the PyTorch path."""
    model = tiny_gemma_with_lora(device, dtype)
    ids = torch.arange(24, device=device).view(2, 12) * 7 % 96
    calls, orig = [], LoRALinearFunction.apply
    try:
        LoRALinearFunction.apply = lambda *a: calls.append(1) or orig(*a)
        fused = run_backend(model, ids, "triton")
    finally:
        LoRALinearFunction.apply = orig
    assert len(calls) == 14  # 2 layers x 7 projections, all through the fused op
    plain = run_backend(model, ids, "torch")
    if dtype == torch.float32:  # both are float32 GEMMs, equal up to summation order
        for got, expected in zip(fused, plain, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        return
    # 16-bit: both paths round (different) intermediates, so compare each with the same model in
    # float32 and ask the fused path to be about as accurate as PyTorch's own 16-bit path.
    exact = run_backend(copy.deepcopy(model).float(), ids, "torch")
    for got, expected, ref in zip(fused, plain, exact, strict=True):
        err_fused, err_torch = (got - ref).norm().item(), (expected - ref).norm().item()
        assert err_fused <= 1.5 * err_torch + 1e-3 * ref.norm().item(), (err_fused, err_torch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_fused_equals_pytorch(dtype):
    gemma_fused_vs_pytorch(DEV, dtype)


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_lora_linear.py"
    spec = importlib.util.spec_from_file_location("bench_lora_linear", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_plan_runs_without_gpu(capsys):
    bench = load_benchmark()
    assert bench.main(["--dry-run", "--shrink", "separate"]) == 0
    plan = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    # distinct (in, out) projections: gemma-3-1b 5 (k = v), gemma-7b 4 (q = k = v), gemma-2-9b 5
    assert len(plan) == (5 + 4 + 5) * 3
    assert ["gemma-7b", "q/k/v", "3072", "->", "4096", "r=8"] in plan
    assert ["gemma-2-9b", "down", "14336", "->", "3584", "r=64"] in plan
    if not torch.cuda.is_available():
        assert bench.main(["--quick"]) == 1  # says it needs a GPU, does not crash


@pytest.mark.parametrize("fuse_shrink", [True, False])
def test_benchmark_sanity_check_and_summary(fuse_shrink, monkeypatch, tmp_path, capsys):
    # the parts of a GPU run that do not time anything: the check of the op against the unfused LoRA
    # (with the shrink placement being timed), the table and the Markdown summary
    bench = load_benchmark()
    x, W, _, A, B, dy = make_inputs((40,), 24, 16, 4, torch.bfloat16, bias=False)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    assert bench.sanity_check(x, W, A, B, 2.0, dy, fuse_shrink) == []
    import minilora.kernels as kernels_module

    monkeypatch.setattr(kernels_module, "lora_linear", lambda *a, **k: 1.1 * lora_linear(*a, **k))
    failures = bench.sanity_check(x, W, A, B, 2.0, dy, fuse_shrink)  # 10% off: caught, each result named
    assert [f.split()[0] for f in failures] == ["y", "dx", "dA", "dB"], failures

    fake = lambda *a: dict(base=(1.0, 2.0), torch=(1.5, 3.3), minilora=(1.02, 2.4), failures=[], checked=True)
    monkeypatch.setattr(bench, "bench_one", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Fake GPU")
    out = tmp_path / "results.md"
    assert bench.main(["--quick", "--no-peft", "--markdown", str(out)]) == 0
    table = out.read_text()
    assert table in capsys.readouterr().out
    assert "device: Fake GPU" in table and "Triton " in table and "--quick --no-peft" in table
    row = "| gemma-3-1b | q | 1152->1024 | 16 | 1.000 | 1.500x | 1.020x | 2.000 | 1.650x | 1.200x "
    assert row + "| ok, MISS | ok |" in table


# Compiles the kernels for an H100 (sm_90) without a GPU, as the JIT would specialise them for
# bf16 Gemma shapes, and checks (1) the code uses the tensor cores (wgmma) and pipelined async loads,
# (2) every pointer offset is int64, (3) the autotune configs the shared-memory pruning keeps fit in an
# H100's 227 KB. The CPU interpreter is laxer than the compiler (dot shapes, dtypes) and wraps int32
# the same way, and has no shared memory, so this catches what it cannot.
_COMPILE_FOR_H100 = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import minilora.kernels
L = sys.modules["minilora.kernels.lora_linear"]

def compile(fn, args, meta, warps=4, stages=3):
    sig, consts, attrs = {}, dict(meta), {}
    for i, name in enumerate(fn.arg_names):
        v = args.get(name, meta.get(name))
        if name in meta or v == 1:  # the JIT turns ints equal to 1 into constants
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if isinstance(v, float) else "i32"
            if isinstance(v, int) and v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    try:
        src = ASTSource(fn, sig, {(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs)
        target = GPUTarget("cuda", 90, 32)
    except TypeError as e:  # another Triton's internal API: nothing to check here
        print("AOT-API", e)
        sys.exit(3)
    k = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
    ir = k.asm["ttgir"]
    # tt.addptr %ptr, %offset : <pointer type>, <offset type>: any offset type but i64 may wrap
    offsets = re.findall(r"tt\.addptr [^:\n]*: [^,\n]+, (\S+)", k.asm["ttir"])
    return dict(wgmma=ir.count("warp_group_dot"), async_loads=ir.count("async_copy_global_to_local"),
                addptr=len(offsets), narrow_offsets=[t for t in offsets if not re.search(r"i64>?$", t)],
                shared=k.metadata.shared)

M, N, K, r = 4096, 1024, 1152, 16
bf, f32 = "*bf16", "*fp32"
mm = dict(x_ptr=bf, w_ptr=bf, bias_ptr=bf, xa_ptr=f32, a_ptr=bf, b_ptr=bf, out_ptr=bf, R=r, m_bucket=M,
          stride_xar=1, stride_xam=r, stride_on=1, shrink_scale=2.0, lr_scale=2.0, seed=7, p=0.1)
tiles = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, R_PAD=16, FP64=False, UPCAST=False,
             PRECISION="tf32")
# forward: w = W.T, a = A.T, b_lr = B.T; backward: w = W, a = B, b_lr = A
fwd = dict(mm, M=M, N=N, K=K, stride_xm=K, stride_xk=1, stride_wk=1, stride_wn=K, stride_ak=1,
           stride_ar=K, stride_br=1, stride_bn=r, stride_om=N)
bwd = dict(mm, M=M, N=K, K=N, stride_xm=N, stride_xk=1, stride_wk=K, stride_wn=1, stride_ak=r,
           stride_ar=1, stride_br=K, stride_bn=1, stride_om=K)
shrink = dict(out_ptr=f32, R=r, k_per_split=512, stride_or=1, scale=2.0, seed=7, p=0.1)
xa = dict(shrink, x_ptr=bf, a_ptr=bf, M=M, K=K, stride_xm=K, stride_xk=1, stride_ar=K, stride_ak=1,
          stride_os=M * r, stride_om=r)
dA = dict(shrink, x_ptr=bf, a_ptr=f32, M=K, K=M, stride_xm=1, stride_xk=K, stride_ar=1, stride_ak=r,
          stride_os=K * r, stride_om=1, stride_or=K)
meta = dict(BLOCK_M=64, BLOCK_K=64, R_PAD=16, DROPOUT=True, FP64=False, UPCAST=False, PRECISION="tf32")
kernel = L._lora_mm_kernel
kernels = {
    "y": compile(kernel, fwd, dict(tiles, HAS_BIAS=True, DROPOUT=False, FUSE_SHRINK=False), 4, 4),
    "y, xa": compile(kernel, fwd, dict(tiles, HAS_BIAS=False, DROPOUT=False, FUSE_SHRINK=True), 8, 3),
    "dx, dyb": compile(kernel, bwd, dict(tiles, HAS_BIAS=False, DROPOUT=True, FUSE_SHRINK=True), 8, 3),
    "xa (dropout)": compile(L._shrink_kernel, xa, dict(meta, X_IS_T=False)),
    "dA": compile(L._shrink_kernel, dA, dict(meta, X_IS_T=True)),
}

# Shared memory: per (dtype, R_PAD, in-loop shrink), the autotune configs the pruning keeps for an H100;
# the one with the largest estimate is compiled (the others have smaller tiles). A config compiled at
# R_PAD = 128 bounds itself at R_PAD = 64 (a smaller tile of a, none at all without the in-loop shrink),
# so a config the two share is compiled once.
smem, compiled = [], {}
configs = [L._config(*c) for c in L._MM_CONFIGS]
fallback = str(L._config(*L._MM_CONFIGS[-1]))


def estimate(c, r_pad, fuse, elsize):
    kw = c.kwargs
    return L._smem_bytes(kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_stages, r_pad, fuse, elsize)


for ptr, elsize in ((bf, 2), (f32, 4)):  # float32 here is TF32 on the tensor cores
    for r_pad in (128, 64):
        for fuse in (False, True):
            kept = L._fitting(configs, r_pad, fuse, elsize, L._SMEM_H100)
            c = max(kept, key=lambda c: estimate(c, r_pad, fuse, elsize))
            key = (ptr, str(c), fuse)
            if key not in compiled:
                ptrs = dict(x_ptr=ptr, w_ptr=ptr, bias_ptr=ptr, a_ptr=ptr, b_ptr=ptr, out_ptr=ptr)
                args = dict(fwd, **ptrs, R=r_pad - 1, stride_xam=r_pad - 1, stride_bn=r_pad - 1)
                consts = dict(R_PAD=r_pad, FP64=False, UPCAST=False, PRECISION="tf32", HAS_BIAS=False,
                              DROPOUT=False, FUSE_SHRINK=fuse)
                got = compile(kernel, args, dict(c.kwargs, **consts), c.num_warps, c.num_stages)
                est = estimate(c, r_pad, fuse, elsize)
                compiled[key] = dict(shared=got["shared"], r_pad=r_pad, estimate=est)
            smem.append(dict(case=f"{ptr[1:]} R_PAD={r_pad} fuse={fuse}", config=str(c), kept=len(kept),
                             fallback_kept=fallback in map(str, kept), compiled=compiled[key]))
print(json.dumps(dict(kernels=kernels, smem=smem, limit=L._SMEM_H100)))
"""


@pytest.fixture(scope="module")
def h100_compile():
    import json
    import os
    import subprocess

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are compiled and run for real")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], capture_output=True, text=True, env=env)
    if proc.returncode == 3:
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_kernels_compile_for_h100_with_tensor_cores(h100_compile):
    for kernel, report in h100_compile["kernels"].items():
        assert report["wgmma"] > 0 and report["async_loads"] > 0, (kernel, report)


def test_pointer_offsets_are_int64(h100_compile):
    # x.T (dA) and dy.T (dB) step a whole row of features per token: tokens x features > 2^31 at
    # realistic sizes (87k tokens of gemma-7b's 24576-wide MLP), which an int32 offset would wrap
    for kernel, report in h100_compile["kernels"].items():
        assert report["addptr"] > 0 and not report["narrow_offsets"], (kernel, report)


def test_autotune_configs_fit_in_h100_shared_memory(h100_compile):
    # float32 with TF32 and the in-loop shrink at R_PAD >= 64: none of the tutorial's tiles fits, the
    # pruning keeps the small fallback, and whatever it keeps compiles within 227 KB
    limit = h100_compile["limit"]
    assert len(h100_compile["smem"]) == 8
    for case in h100_compile["smem"]:
        compiled = case["compiled"]  # the case's config, compiled at R_PAD = 128 or at the case's R_PAD
        assert case["fallback_kept"] and compiled["shared"] <= limit, case
        assert compiled["shared"] <= compiled["estimate"], case  # the pruning's estimate is not optimistic
