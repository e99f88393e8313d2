"""GGUF's block formats kept packed (minilora/ggml.py): dequantization bit for bit against the `gguf`
package (llama.cpp's own numpy reference), and the frozen layers built on them (Linear4bit with a
BlockState, the packed embedding and tied head, LoRA over them) against dense PyTorch."""

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from minilora.kernels.ggml_dequant import dequantize_ggml_triton

import minilora as ml
from minilora import ggml
from minilora.ggml import BLOCK_TYPES, DENSE_TYPES, BlockState, Embedding, dequantize
from minilora.quant import Linear4bit, Linear4bitFunction

gguf = pytest.importorskip("gguf")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SCALE_OFFSETS = {8: (0,), 2: (0,), 6: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}  # float16 d, dmin


def random_packed(ggml_type, rows, blocks_per_row, seed=0, extremes=True):
    """Random blocks: every bit pattern of the quants; float16 scales of mixed sign and size, with a
    zero, a subnormal and a large one (`extremes`)."""
    g = np.random.default_rng(seed)
    _, values, size = BLOCK_TYPES[ggml_type]
    b = g.integers(0, 256, (rows * blocks_per_row, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[ggml_type]:
        d = (g.standard_normal(len(b)) * 10.0 ** g.integers(-4, 1, len(b))).astype(np.float16)
        d[:3] = [0.0, 6e-8, 300.0] if extremes else d[:3]
        b[:, off : off + 2] = d.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", sorted(BLOCK_TYPES), ids=lambda t: BLOCK_TYPES[t][0])
def test_dequantize_bit_exact_with_gguf(ggml_type):
    packed = random_packed(ggml_type, rows=7, blocks_per_row=3)
    ref = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType(ggml_type))
    ours = dequantize(torch.from_numpy(packed), ggml_type)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))  # bits, incl. -0.0
    # the compute dtype: the float32 values rounded once; leading dims are rows (a lookup)
    rows = torch.tensor([[2, 0], [6, 6]])
    bf16 = dequantize(torch.from_numpy(packed)[rows], ggml_type, torch.bfloat16)
    assert torch.equal(bf16, torch.from_numpy(ref)[rows].bfloat16())


@pytest.mark.parametrize("ggml_type", sorted(DENSE_TYPES), ids=lambda t: DENSE_TYPES[t][0])
def test_dense_types_as_gguf(ggml_type):
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    stored = gguf.quants.quantize(x, gguf.GGMLQuantizationType(ggml_type))
    raw = torch.from_numpy(np.ascontiguousarray(stored).view(np.uint8).reshape(5, -1))
    ref = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType(ggml_type))
    assert np.array_equal(dequantize(raw, ggml_type).numpy(), ref)


# ----------------------------------------------------------------------------------------------------
# The Triton kernel (Triton's interpreter without a GPU) against the PyTorch dequantization
# ----------------------------------------------------------------------------------------------------
def triton_bits(packed, ggml_type, dtype):
    """The kernel's output for `packed` (on the GPU if there is one) as raw bytes, on the CPU."""
    out = torch.empty(ggml.values_shape(packed.shape, ggml_type), dtype=dtype, device=DEV)
    out = dequantize_ggml_triton(packed.to(DEV), ggml_type, out)
    return out.cpu().view(torch.uint8)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the interpreter's float16 inf
@pytest.mark.parametrize("ggml_type", sorted(BLOCK_TYPES), ids=lambda t: BLOCK_TYPES[t][0])
def test_triton_dequant_equals_torch_bit_for_bit(ggml_type):
    # 3 rows of 5 blocks: the last program's blocks run past the end (32 blocks of 32 values or 4 of
    # 256 per program); extreme scales (float16 0, subnormal, 300: float16 overflows to inf)
    packed = torch.from_numpy(random_packed(ggml_type, rows=3, blocks_per_row=5))
    ref = dequantize(packed, ggml_type)  # float32
    lookup = torch.tensor([[2, 0], [1, 1]])  # leading dims are rows
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the float32 value rounded once
        assert torch.equal(triton_bits(packed, ggml_type, dtype), ref.to(dtype).view(torch.uint8)), dtype
        assert torch.equal(
            triton_bits(packed[lookup], ggml_type, dtype), ref[lookup].to(dtype).view(torch.uint8)
        )


def test_triton_dequant_checks_its_arguments():
    packed = torch.from_numpy(random_packed(12, rows=2, blocks_per_row=1, extremes=False))  # Q4_K (2, 256)
    with pytest.raises(ValueError, match=r"contiguous float32/bfloat16/float16 tensor of shape \(2, 256\)"):
        dequantize_ggml_triton(packed, 12, torch.empty(2, 255))
    with pytest.raises(ValueError, match=r"shape \(2, 256\) for these Q4_K rows, got torch.float64"):
        dequantize_ggml_triton(packed, 12, torch.empty(2, 256, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_ggml_triton(packed, 12, torch.empty(256, 2).T)
    with pytest.raises(
        ValueError, match=r"rows of whole Q4_K blocks \(144 bytes each\), got torch.uint8 \(2, 100\)"
    ):
        dequantize_ggml_triton(packed[:, :100], 12, torch.empty(2, 256))
    with pytest.raises(ValueError, match="contiguous uint8 rows"):
        dequantize_ggml_triton(packed.T.contiguous().T, 12, torch.empty(2, 256))
    with pytest.raises(ValueError, match="ggml_type 0 is not a block format; use one of"):
        dequantize_ggml_triton(packed, 0, torch.empty(2, 256))
    assert dequantize_ggml_triton(packed[:0], 12, torch.empty(0, 256)).shape == (0, 256)  # no launch


@requires_gpu
@pytest.mark.parametrize("ggml_type", sorted(BLOCK_TYPES), ids=lambda t: BLOCK_TYPES[t][0])
def test_block_state_dequantizes_with_the_kernel_on_cuda(ggml_type):
    layer = packed_linear(ggml_type, out=24, blocks=2)  # (24, 512) or (24, 64)
    W, x, ids = layer.dequantize(), torch.randn(3, layer.in_features, device="cuda"), torch.tensor([5, 0, 5])
    layer.cuda()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(layer.dequantize(dtype).cpu(), W.to(dtype))
        assert torch.equal(
            layer.quant_state.dequantize(layer.weight[ids.cuda()], dtype).cpu(), W[ids].to(dtype)
        )
    # through quant._dense's reused scratch buffer: the same GEMM as over the dequantized W
    torch.testing.assert_close(layer(x), F.linear(x, W.cuda()), rtol=0, atol=0)
    layer.to(torch.bfloat16)
    torch.testing.assert_close(
        layer(x.bfloat16()), F.linear(x.bfloat16(), W.bfloat16().cuda()), rtol=0, atol=0
    )


def packed_linear(ggml_type=12, out=24, blocks=2, seed=0):
    packed = torch.from_numpy(random_packed(ggml_type, out, blocks, seed, extremes=False))
    state = BlockState(ggml_type, (out, blocks * BLOCK_TYPES[ggml_type][1]))
    return Linear4bit(packed, state)


def test_packed_linear_is_dense_linear_and_saves_only_the_packed_weight():
    layer = packed_linear()
    W = layer.dequantize()  # (24, 512)
    x = torch.randn(3, 5, 512, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, W))
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.uint8  # never a dense W
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, torch.ones(3, 5, 24) @ W)
    assert not layer.weight.requires_grad and "Q4_K" in repr(layer)
    xd = torch.randn(2, 512, dtype=torch.float64, requires_grad=True)
    fn = lambda x: Linear4bitFunction.apply(x, layer.weight, None, layer.quant_state)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (xd,))  # dequantized to float64 (exact from float32)


def test_packed_linear_follows_model_dtype_and_autocast():
    layer = packed_linear(ggml_type=6, blocks=16)  # (24, 512)
    W = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.uint8 and layer.quant_state.dtype == torch.bfloat16
    x = torch.randn(4, 512)
    assert torch.equal(layer(x.bfloat16()), F.linear(x.bfloat16(), W.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_lora_over_packed_linear_is_the_equation_and_keeps_its_state_dict():
    layer = packed_linear(ggml_type=14)
    W = layer.dequantize()
    lora = ml.LoRALinear(layer, r=4, alpha=8)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 512)
    torch.testing.assert_close(lora(x), x @ W.T + 2.0 * (x @ lora.lora_A.T) @ lora.lora_B.T)
    assert torch.equal(lora.merged_weight(), (W + lora.delta_weight()))
    with pytest.raises(ValueError, match="cannot merge into a 4-bit base"):
        lora.merge()
    state = lora.state_dict()
    assert sorted(state) == ["lora_A", "lora_B", "weight"]  # the blocks carry their own scales
    fresh = ml.LoRALinear(packed_linear(ggml_type=14, seed=1), r=4, alpha=8)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.base_weight(), W) and torch.equal(fresh(x), lora(x))


def test_packed_embedding_lookup_and_tied_head_in_chunks(monkeypatch):
    monkeypatch.setattr(ggml, "HEAD_VALUES", 7 * 64)  # 30 rows: chunks of 7, 7, 7, 7, 2
    packed = torch.from_numpy(random_packed(8, 30, 2, extremes=False))
    emb = Embedding(packed, BlockState(8, (30, 64)))
    W = emb.dequantize()
    ids = torch.tensor([[3, 29, 3], [0, 1, 2]])
    assert torch.equal(emb(ids), W[ids])
    assert torch.equal(emb.dequantize(start=5, stop=9), W[5:9])
    h = torch.randn(2, 3, 64, requires_grad=True)
    logits = emb.head(h)
    close = dict(rtol=1e-5, atol=1e-3)  # |logits| ~ 50: float32 sums in another order per chunk
    torch.testing.assert_close(logits, h @ W.T, **close)
    assert all(t.dtype == torch.uint8 for t in logits.grad_fn.next_functions[0][0].saved_tensors)
    (dh,) = torch.autograd.grad((logits * logits).sum(), h)
    torch.testing.assert_close(dh, 2 * (h @ W.T) @ W, rtol=1e-5, atol=1e-1)


def test_keep_dequantized_reuses_each_weight_within_its_budget(monkeypatch):
    """Inside keep_dequantized a packed layer and each chunk of a packed head are dequantized once,
    while the budget lasts (past it: per call, as outside); the outputs are the same."""
    monkeypatch.setattr(ggml, "HEAD_VALUES", 7 * 64)  # 30 rows: chunks of 7, 7, 7, 7, 2
    layer = packed_linear(ggml_type=14)  # (24, 512)
    emb = Embedding(torch.from_numpy(random_packed(8, 30, 2, extremes=False)), BlockState(8, (30, 64)))
    x, h = torch.randn(3, 512), torch.randn(2, 64)
    want = layer(x), emb.head(h)
    calls, dequantize = [], BlockState.dequantize

    def counted(self, packed, *args, **kwargs):
        calls.append(packed.shape[0])
        return dequantize(self, packed, *args, **kwargs)

    monkeypatch.setattr(BlockState, "dequantize", counted)
    for budget, kept in ((None, 24 + 30), (4 * (24 * 512 + 7 * 64), 24 + 7)):  # all; the layer + 1 chunk
        calls.clear()
        with ml.quant.keep_dequantized(budget):
            for _ in range(3):
                assert torch.equal(layer(x), want[0]) and torch.equal(emb.head(h), want[1])
        assert sum(calls) == kept + 3 * (24 + 30 - kept)  # kept: once; the rest: on each of 3 calls
    calls.clear()
    layer(x)
    assert calls == [24]  # after the block: nothing kept
    with ml.quant.keep_dequantized():  # per thread: another thread's calls keep nothing
        layer(x)
        worker = threading.Thread(target=layer, args=(x,))
        worker.start()
        worker.join()
        layer(x)
    assert calls == [24, 24, 24]  # this thread's block once, the other thread once


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_fused_loss_over_the_packed_head_reads_it_in_chunks(monkeypatch, cap, dtype):
    """The loss over a packed head equals the loss over its dequantized weight (loss and dh), never
    dequantizing more than one chunk of vocabulary rows at a time. bfloat16: the compute dtype of the
    products; the loss and dh are float32 (dh: the chunks' products summed in float32)."""
    from minilora.loss import linear_cross_entropy

    monkeypatch.setattr(ggml, "HEAD_VALUES", 7 * 64)  # 30 rows: chunks of 7, 7, 7, 7, 2
    emb = Embedding(torch.from_numpy(random_packed(8, 30, 2, extremes=False)), BlockState(8, (30, 64)))
    W = emb.dequantize(dtype)
    h = (torch.randn(9, 64) * 0.05).to(dtype).requires_grad_()
    y = torch.tensor([0, 29, -100, 7, 13, 14, 2, -100, 28])
    dequantized = []
    monkeypatch.setattr(BlockState, "dequantize", lambda self, p, dtype=None, out=None: dequantized.append(
        p.shape[0]) or dequantize(p, 8, dtype or torch.float32))  # fmt: skip
    got = linear_cross_entropy(h, emb, y, cap, chunk_size=4)  # 7 labelled rows: 4 + 3
    (dh,) = torch.autograd.grad(got, h)
    assert max(dequantized) == 7 and sum(dequantized) == 2 * 2 * 30  # logits and dh, per chunk of rows
    want = linear_cross_entropy(h, W, y, cap, chunk_size=4)
    (dh_want,) = torch.autograd.grad(want, h)
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: dh's products rounded per chunk vs once
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(dh, dh_want, rtol=rtol, atol=rtol * float(dh_want.abs().max()))
