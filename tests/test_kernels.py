"""The fused LoRA op (kernels/lora_linear.py) against plain PyTorch, for every plan.

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes are small; the same tests run compiled on a GPU. The reference is the LoRA equation in
float64 on the very same input values, and the tolerance is derived per element, not guessed:

    |kernel - exact| <= 2 * (c u + n 2^-24) * mag

where mag is the same computation on absolute values (|x| @ |W|.T + ...; for a gradient, the same
backward with |dy|), n the longest reduction (M, K, N or r: fp32 accumulation costs n * 2^-24 * mag,
Higham's gamma_n), u the unit roundoff of the dtype and c the roundings to it on the way: 2 for the
Triton plan (the rank-r intermediate xa or dyb, rounded before its second product as PyTorch's bf16
LoRA does, and the output), 4 for the cuBLAS products (each thin product's output, the scaled copy,
the partial sum y0 or dx0, the output). The leading 2 is headroom. u = 2^-24 (float32), 2^-8
(bfloat16, 8 significant bits), 2^-11 (float16).
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from minilora.kernels import PLANS, LoRALinearFunction, dropout_mask, lora_linear
from torch import nn

import minilora
from minilora.gemma import Gemma, GemmaConfig
from minilora.ggml import BLOCK_TYPES

L = sys.modules[LoRALinearFunction.__module__]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _interpreter_truncates_bf16() -> bool:
    """Triton's CPU interpreter casts float32 to bfloat16 by truncation unless tests/conftest.py made it
    round to nearest even as a GPU does; where it still truncates, its bf16 errors are 4-6x a GPU's."""
    if torch.cuda.is_available():
        return False
    from triton.runtime import interpreter

    cast = getattr(getattr(interpreter, "InterpreterBuilder", None), "cast_impl", None)
    return not getattr(cast, "rounds_to_nearest_even", False)


BF16_CAST_ERROR = 4.0 if _interpreter_truncates_bf16() else 1.0


@pytest.fixture(autouse=True)
def every_row_count_through_the_plan(monkeypatch):
    """The op sends M <= 64 rows to cuBLAS whatever the plan; the tests' small M must reach the plan's
    kernels (test_small_m_takes_the_cublas_products restores the threshold)."""
    monkeypatch.setattr(L, "SMALL_M", 0)


def make_inputs(lead, K, N, r, dtype, bias=True, seed=0, adapter_dtype=None):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, dt=dtype: torch.randn(*shape, generator=g).to(DEV, dt)
    x = rand(*lead, K)
    W = rand(N, K) / math.sqrt(K)
    b = rand(N) if bias else None
    A = rand(r, K, dt=adapter_dtype or dtype) / math.sqrt(K)
    B = rand(N, r, dt=adapter_dtype or dtype)  # not zero (its init), so the low-rank path is exercised
    dy = rand(*lead, N)
    return x, W, b, A, B, dy


def run_kernel(x, W, b, A, B, s, dy, p=0.0, seed=None, **kw):
    x, A, B = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = lora_linear(x, W, b, A, B, s, p, p > 0, seed=seed, **kw)
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


def assert_close_derived(got, x, W, b, A, B, s, dy, keep=None, p=0.0, u=None, roundings=2):
    exact = reference(x, W, b, A, B, s, dy, keep, p)
    mag = reference(x, W, b, A, B, s, dy, keep, p, absolute=True)
    n = max(x.shape[-1], W.shape[0], x.numel() // x.shape[-1], A.shape[0])
    u = UNIT_ROUNDOFF[x.dtype] if u is None else u
    for name, g, e, m, like in zip(("y", "dx", "dA", "dB"), got, exact, mag, (x, x, A, B), strict=True):
        assert g.dtype == like.dtype and g.shape == e.shape, name
        tol = 2 * (roundings * u + n * 2.0**-24) * m + 1e-30
        err = (g.double() - e).abs()
        worst = (err / tol).max().item()
        assert worst <= 1.0, f"{name}: error {err.max().item():.3g} is {worst:.2f}x the derived bound"


ROUNDINGS = {"triton": 2, "hybrid": 4, "composite": 4}
CASES = [  # (leading dims, in K, out N, bias): none of M, K, N a multiple of a tile
    ((37,), 45, 29, True),
    ((2, 7), 33, 70, False),
    ((1,), 17, 5, True),
]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [5, 128])  # R_PAD 16 and the largest, 128
@pytest.mark.parametrize("lead,K,N,bias", CASES)
def test_every_plan_matches_the_reference(lead, K, N, bias, r, dtype, plan):
    x, W, b, A, B, dy = make_inputs(lead, K, N, r, dtype, bias)
    s = 16 / r
    got = run_kernel(x, W, b, A, B, s, dy, plan=plan)
    assert got[0].shape == (*lead, N)
    assert_close_derived(got, x, W, b, A, B, s, dy, roundings=ROUNDINGS[plan])


@pytest.mark.parametrize("r", [1, 16, 33, 64, 100])  # R_PAD 16, 16, 64, 64, 128: every rank-r step count
def test_triton_plan_at_every_padded_rank(r):
    x, W, b, A, B, dy = make_inputs((2, 7), 33, 70, r, torch.bfloat16, bias=True)
    got = run_kernel(x, W, b, A, B, 16 / r, dy, p=0.2, seed=3, fuse_shrink=False)
    keep = dropout_mask(3, (14, 33), 0.2, device=DEV)
    assert_close_derived(got, x, W, b, A, B, 16 / r, dy, keep=keep, p=0.2)


@pytest.mark.parametrize("fuse_shrink", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_shrink_in_gemm_loop_or_separate(dtype, fuse_shrink):
    # x @ A.T computed inside the GEMM's K loop, or by the separate shrink kernel
    x, W, b, A, B, dy = make_inputs((37,), 45, 29, 5, dtype, bias=True)
    got = run_kernel(x, W, b, A, B, 3.2, dy, fuse_shrink=fuse_shrink)
    assert_close_derived(got, x, W, b, A, B, 3.2, dy)


@pytest.mark.parametrize("plan", PLANS)
def test_float32_adapters_under_16_bit_inputs(plan):
    # LoRALinear's float32 adapters go in as they are: no cast launches; their gradients stay float32
    x, W, b, A, B, dy = make_inputs((2, 7), 33, 70, 8, torch.bfloat16, adapter_dtype=torch.float32)
    got = run_kernel(x, W, b, A, B, 2.0, dy, p=0.3, seed=9, plan=plan)
    assert got[2].dtype == got[3].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    keep = dropout_mask(9, (14, 33), 0.3, device=DEV)
    exact = reference(x, W, b, A, B, 2.0, dy, keep, 0.3)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, exact, strict=True):
        rel = ((g.double() - e).norm() / e.norm()).item()
        assert rel < 2e-2, (name, rel)  # operands rounded to bf16 (8 bits): ~2^-8 apart


def test_rank_above_max_rank_uses_cublas_with_the_same_mask(monkeypatch):
    monkeypatch.setattr(L, "_matmul", None)  # the Triton GEMM must not be reached
    x, W, b, A, B, dy = make_inputs((12,), 20, 10, 130, torch.float32)
    keep = dropout_mask(4, (12, 20), 0.25, device=DEV)
    got = run_kernel(x, W, b, A, B, 0.5, dy, p=0.25, seed=4)
    assert_close_derived(got, x, W, b, A, B, 0.5, dy, keep=keep, p=0.25, roundings=4)


def test_small_m_takes_the_cublas_products(monkeypatch):
    monkeypatch.setattr(L, "SMALL_M", 64)
    monkeypatch.setattr(L, "_matmul", None)  # decoding: GEMVs, no Triton GEMM
    x, W, b, A, B, dy = make_inputs((3, 21), 20, 10, 4, torch.float32)
    got = run_kernel(x, W, b, A, B, 0.5, dy)
    assert_close_derived(got, x, W, b, A, B, 0.5, dy, roundings=4)


@pytest.mark.parametrize("plan", ["triton", "hybrid"])
def test_non_contiguous_inputs_bias_and_grad_output(plan):
    x, W, b, A, B, _ = make_inputs((40,), 11, 24, 5, torch.float32)
    x = torch.randn(40, 11, 3, device=DEV).permute(2, 1, 0)  # (3, 11, 40), not contiguous
    W = torch.randn(40, 24, device=DEV).t()  # (24, 40) transposed view
    b = torch.randn(48, device=DEV)[::2]  # every other element
    A = torch.randn(5, 40, device=DEV)
    dy = torch.randn(24, 11, 3, device=DEV).permute(2, 1, 0)  # (3, 11, 24)
    assert not (x.is_contiguous() or W.is_contiguous() or b.is_contiguous() or dy.is_contiguous())
    got = run_kernel(x, W, b, A, B, 0.5, dy, plan=plan)
    assert_close_derived(got, x, W, b, A, B, 0.5, dy, roundings=ROUNDINGS[plan])


@pytest.mark.parametrize(
    "plan,p,fuse_shrink",
    [("triton", 0.0, None), ("triton", 0.5, None), ("triton", 0.0, False), ("hybrid", 0.5, None)],
)
def test_gradcheck_float64(plan, p, fuse_shrink):
    # float64 runs the kernels' FMA path (no fp64 tl.dot); s and 1/(1-p) are exact in the kernels'
    # float32 scalars. A fixed seed makes the dropout mask part of a deterministic function.
    x, W, b, A, B, _ = make_inputs((1, 3), 5, 4, 2, torch.float64)
    x, A, B = (t.requires_grad_() for t in (x, A, B))
    fn = lambda x, A, B: lora_linear(x, W, b, A, B, 0.5, p, True, seed=11, plan=plan, fuse_shrink=fuse_shrink)
    assert torch.autograd.gradcheck(fn, (x, A, B), eps=1e-6, atol=1e-8)


def test_autotune_pruning_keeps_only_configs_that_fit(monkeypatch):
    # the autotuner's early_config_prune hook, as Triton calls it (no GPU needed: the limit is patched)
    monkeypatch.setattr(L, "_smem_limit", lambda device: L._SMEM_H100)
    configs = [L._config(*c) for c in L._MM_CONFIGS]
    x = torch.empty(0, dtype=torch.float32)
    x_on_gpu = type("FakeTensor", (), dict(device=torch.device("cuda", 0), element_size=x.element_size))()
    kept = lambda N=4096, **meta: [str(c) for c in L._prune(configs, dict(x_ptr=x_on_gpu, N=N), **meta)]
    assert len(kept(R_PAD=128, LORA=1)) == 3  # float32 (TF32) tiles are twice as big as bf16's
    # the in-loop shrink needs one column tile (BLOCK_N >= N): in float32 none fits, the smallest runs
    assert kept(N=200, R_PAD=32, LORA=2) == [str(configs[-1])]
    x_on_gpu.element_size = lambda: 2  # bf16: every config fits
    assert len(kept(R_PAD=128, LORA=1)) == len(configs)
    assert len(kept(N=256, R_PAD=32, LORA=2)) == 2  # the two with BLOCK_N = 256
    assert kept(N=300, R_PAD=32, LORA=2) == [str(configs[-1])]


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
        assert L._common_meta(torch.float32, False)["PRECISION"] == "tf32"
        x, W, b, A, B, dy = make_inputs((100,), 64, 96, 100, torch.float32)
        got = run_kernel(x, W, b, A, B, 0.16, dy)
        assert_close_derived(got, x, W, b, A, B, 0.16, dy, u=2.0**-11)  # TF32 keeps 11 significant bits
    finally:
        if before is not None:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = legacy_before
    assert L._common_meta(torch.float32, False)["PRECISION"] == "ieee"


# ---------------------------------------------------------------------------------------------
# Dropout


@pytest.mark.parametrize(
    "plan,fuse_shrink", [("triton", None), ("triton", False), ("hybrid", None), ("composite", None)]
)
def test_one_dropout_mask_in_forward_and_both_backward_uses(plan, fuse_shrink):
    lead, K, N, r, p, seed = (2, 9), 40, 24, 5, 0.3, 1234
    x, W, b, A, B, dy = make_inputs(lead, K, N, r, torch.float32)
    keep = dropout_mask(seed, (18, K), p, device=DEV)
    assert 0 < keep.sum() < keep.numel()
    got = run_kernel(x, W, b, A, B, 2.0, dy, p=p, seed=seed, plan=plan, fuse_shrink=fuse_shrink)
    assert_close_derived(got, x, W, b, A, B, 2.0, dy, keep=keep, p=p, roundings=ROUNDINGS[plan])
    # and a different mask would not pass: the dropout changes every result (y through xa, dB through
    # xa, dx and dA through the stored bits)
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
    assert not torch.equal(keep[:, 0::4], keep[:, 1::4])  # the four Philox outputs differ
    assert torch.equal(keep, dropout_mask(7, (64, 256), p, device=DEV).double())
    assert not torch.equal(keep, dropout_mask(8, (64, 256), p, device=DEV).double())


def test_dropout_seed_is_drawn_on_the_inputs_device_and_follows_manual_seed(monkeypatch):
    x, W, b, A, B, _ = make_inputs((8,), 16, 16, 4, torch.float32)
    seeds, forward = [], L._forward
    monkeypatch.setattr(L, "_forward", lambda *a: seeds.append(a[7]) or forward(*a))
    run = lambda: lora_linear(x, W, b, A, B, 1.0, 0.5, True)
    torch.manual_seed(3)
    y1 = run()
    assert isinstance(seeds[0], torch.Tensor) and seeds[0].device == x.device  # a CUDA graph replays a draw
    torch.manual_seed(3)
    assert torch.equal(run(), y1)
    assert not torch.equal(run(), y1)


# ---------------------------------------------------------------------------------------------
# The wrapper: checks, devices, torch.compile


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
        (dict(A=torch.zeros(4, 9)), ValueError, r"lora_A \(4, 9\)"),
        (dict(B=torch.zeros(6, 3)), ValueError, r"lora_B \(6, 3\)"),
        (dict(x=torch.zeros(3, 9)), ValueError, r"need x \(\.\.\., in=8\).*got x \(3, 9\)"),
        (dict(A=torch.zeros(4, 8, dtype=torch.float64)), TypeError, "lora_A is torch.float64 but x is"),
        (dict(A=torch.zeros(0, 8), B=torch.zeros(6, 0)), ValueError, r"r >= 1"),
        (dict(W=torch.zeros(6, 8, requires_grad=True)), ValueError, "frozen"),
        (dict(plan="fast"), ValueError, "plan must be one of"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    args = dict(
        x=torch.zeros(3, 8), W=torch.zeros(6, 8), A=torch.zeros(4, 8), B=torch.zeros(6, 4), plan="triton"
    )
    args.update(change)
    args = {k: v.to(DEV) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        lora_linear(args["x"], args["W"], None, args["A"], args["B"], 1.0, 0.0, True, plan=args["plan"])


def test_launches_run_on_the_inputs_device(monkeypatch):
    # Triton launches on the current CUDA device: forward and backward make x's device current (torchrun
    # puts rank k's tensors on GPU k)
    fake = type("T", (), dict(device=torch.device("cuda", 3)))()
    guard = L._device_guard(fake)
    assert isinstance(guard, torch.cuda.device) and guard.idx == 3
    entered = []
    monkeypatch.setattr(L, "_device_guard", lambda t: entered.append(t.device) or L.contextlib.nullcontext())
    x, W, b, A, B, dy = make_inputs((5,), 8, 6, 2, torch.float32)
    run_kernel(x, W, b, A, B, 1.0, dy)
    assert entered == [x.device, x.device]  # forward, backward


def test_compiled_layer_equals_eager():
    # torch.compile sees the registered custom op (no graph break: fullgraph) with its fake and autograd
    # registrations; the seed is a tensor argument, so the compiled graph draws nothing of its own
    x, W, b, A, B, dy = make_inputs((2, 9), 24, 16, 4, torch.float32)
    seed = torch.tensor([5], device=DEV)
    eager = run_kernel(x, W, b, A, B, 2.0, dy, p=0.25, seed=seed)
    torch._dynamo.reset()
    compiled = torch.compile(lora_linear, backend="aot_eager", fullgraph=True)
    xx, AA, BB = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = compiled(xx, W, b, AA, BB, 2.0, 0.25, True, seed=seed)
    y.backward(dy)
    for name, g, e in zip(("y", "dx", "dA", "dB"), (y, xx.grad, AA.grad, BB.grad), eager, strict=True):
        assert torch.equal(g, e), name


@pytest.mark.parametrize("plan,p", [("triton", 0.25), ("triton", 0.0), ("composite", 0.0)])
def test_custom_op_registration_is_consistent(plan, p):
    x, W, b, A, B, _ = make_inputs((20,), 12, 10, 3, torch.float32)
    seed = torch.tensor([1], device=DEV) if p > 0 else None
    args = (x, W, b, A.requires_grad_(), B.requires_grad_(), 2.0, p, seed, plan, -1)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.minilora.lora_fwd.default, args, test_utils=checks)


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


def count_fused_calls(monkeypatch) -> list:
    calls, orig = [], LoRALinearFunction.apply
    monkeypatch.setattr(LoRALinearFunction, "apply", lambda *a: calls.append(a[8]) or orig(*a))
    return calls


@pytest.mark.parametrize("backend", ["triton", "hybrid", "composite"])
def test_lora_linear_kernel_backends_match_torch_backend(backend, monkeypatch):
    layer = lora_layer(40, 24, 4, dropout=0.1).eval()  # eval: dropout off, so both paths are exact
    x = torch.randn(2, 5, 40, device=DEV)
    before = minilora.get_backend()
    try:
        minilora.set_backend("torch")
        expected = forward_backward(layer, x)
        minilora.set_backend(backend)
        calls = count_fused_calls(monkeypatch)
        got = forward_backward(layer, x)
    finally:
        minilora.set_backend(before)
    assert calls == [backend], "the backend did not reach the fused op with its plan"
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)  # float32, summation order apart


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
    exact = forward_backward(layer.double(), x.double())  # both round (different) operands to bf16
    for name, got, want, ref in zip(("y", "dx", "dA", "dB"), results["triton"], plain, exact, strict=True):
        err_fused, err_torch = ((t.double() - ref).norm().item() for t in (got, want))
        assert err_fused <= 1.5 * BF16_CAST_ERROR * err_torch, (name, err_fused, err_torch)


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
    calls = count_fused_calls(monkeypatch)
    before = minilora.get_backend()
    try:
        minilora.set_backend("auto")
        layer(torch.randn(100, 64, device="cuda")).sum().backward()
    finally:
        minilora.set_backend(before)
    assert calls == [minilora.lora._AUTO_CUDA] and layer.lora_A.grad is not None


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("r,p", [(8, 0.0), (100, 0.1)])
@pytest.mark.parametrize(
    "M,K,N", [(512, 1152, 1024), (300, 1024, 6912), (1000, 6912, 1152), (700, 1152, 256)]
)
def test_gemma_shapes_on_gpu(M, K, N, r, p, plan):
    # realistic sizes in bf16: autotuned tiles, several column tiles, split reductions for dA/dB, the
    # in-loop shrink (N = 256, r = 8)
    x, W, b, A, B, dy = make_inputs((M,), K, N, r, torch.bfloat16, bias=False, adapter_dtype=torch.float32)
    got = run_kernel(x, W, b, A, B, 2.0, dy, p=p, seed=5, plan=plan)
    keep = dropout_mask(5, (M, K), p) if p > 0 else None
    exact = reference(x, W, b, A, B, 2.0, dy, keep, p)
    for name, g, e in zip(("y", "dx", "dA", "dB"), got, exact, strict=True):
        rel = ((g.double() - e).norm() / e.norm()).item()
        assert rel < 1e-2, (name, rel)  # bf16 operands: ~2^-8 per rounding, averaged over the tensor


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_fused_equals_pytorch(dtype, monkeypatch):
    model = tiny_gemma_with_lora(DEV, dtype)
    ids = torch.arange(24, device=DEV).view(2, 12) * 7 % 96
    calls = count_fused_calls(monkeypatch)
    fused = run_backend(model, ids, "triton")
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
        bound = 1.5 * BF16_CAST_ERROR * err_torch + 1e-3 * ref.norm().item()
        assert err_fused <= bound, (err_fused, err_torch)


# ---------------------------------------------------------------------------------------------
# Machine code for an H100/H200 (sm_90), compiled ahead of time on the CPU (tests/sm90_compile.py)


@pytest.fixture(scope="module")
def sm90():
    import json
    import os
    import subprocess
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are compiled and run for real")
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    if proc.returncode == 3:
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_kernels_use_the_tensor_cores_and_async_loads(sm90):
    for report in sm90:
        if report["kernel"] not in ("_bits_kernel", "_dequant_blocks_kernel"):
            assert report["wgmma"] > 0 and report["async_loads"] > 0, report


def test_pointer_offsets_are_int64(sm90):
    # x.T (dA) steps a whole row of features per token: tokens x features > 2^31 at realistic sizes
    # (87k tokens of gemma-7b's 24576-wide MLP), which an int32 offset would wrap
    for report in sm90:
        if report["kernel"] == "_dequant_blocks_kernel":  # an int64 block base + offsets within a block
            assert report["addptr"] > len(report["narrow_offsets"]), report
        else:
            assert report["addptr"] > 0 and not report["narrow_offsets"], report


def test_every_kept_config_is_spill_free_and_fits_in_shared_memory(sm90):
    # every GEMM tile config the autotuner may keep (bf16 at R_PAD = 128 with the dropout mask, the
    # in-loop shrink at R_PAD = 32, float32/TF32 where it fits), the shrink and dy passes' configs
    kernels = {r["kernel"] for r in sm90}
    assert {"_mm_kernel", "_shrink_kernel", "_dy_kernel"} <= kernels
    assert sum(r["kernel"] == "_mm_kernel" and r["config"][2]["LORA"] == 1 for r in sm90) >= len(
        L._MM_CONFIGS
    )
    for report in sm90:
        assert report["stack"] == 0 and report["local"] == 0, report  # no register spills
        assert report["shared"] <= L._SMEM_H100, report
        if report.get("estimate"):
            assert report["shared"] <= report["estimate"], report  # the pruning's estimate is not optimistic


def test_gguf_dequant_compiles_for_every_format_without_fma(sm90):
    # bit-exact with PyTorch on a GPU: no product contracted into an FMA (d * sc * q - dmin * m)
    reports = [r for r in sm90 if r["kernel"] == "_dequant_blocks_kernel"]
    assert sorted(r["config"][2]["TYPE"] for r in reports) == sorted(n for n, _, _ in BLOCK_TYPES.values())
    assert all(r["fma"] == 0 for r in reports), reports


# ---------------------------------------------------------------------------------------------
# The GPU probe's logic, on the CPU


def test_gpu_probe_cpu_smoke(tmp_path):
    import json
    import os
    import subprocess
    from pathlib import Path

    probe = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_probe.py"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(probe), "--cpu-smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "probe.jsonl").read_text().splitlines()]
    sections = {r["section"] for r in records}
    assert {"env", "eta", "layer", "dropout", "decode", "compile", "decision"} <= sections, sections
    assert all(r.get("ok", True) for r in records if r["section"] == "layer"), records
    summary = (tmp_path / "probe.md").read_text()
    assert "Decision" in summary and "| gemma" in summary
