"""4-bit base weights and the 8-bit AdamW (minilora/quant.py, minilora/optim.py, kernels/dequant.py).

bitsandbytes is the oracle, on the CPU: quantization, double quantization, the saved tensors and the
optimizer are compared with it bit for bit (same format, same float operations in the same order, on
the same device: any difference is a real divergence, so the tolerance is 0). The Triton kernel runs
in Triton's interpreter without a GPU (tests/conftest.py) and must equal the PyTorch path bit for bit.
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from minilora.kernels.dequant import dequantize_4bit_triton
from torch import nn

import minilora as ml
from minilora.optim import AdamW8bit
from minilora.quant import (
    Linear4bit,
    Linear4bitFunction,
    code_4bit,
    dequantize_4bit,
    dequantize_8bit,
    dynamic_map,
    quantize_4bit,
    quantize_8bit,
    quantize_model,
)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bnb_functional():
    return pytest.importorskip("bitsandbytes").functional


def weight(shape, seed=0, dtype=torch.float32):
    """Random rows of different scales, with zeros and values near zero (FP4's +0 / -0 codes)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * (0.1 + 3 * torch.rand(shape[0], 1, generator=g))
    w.view(-1)[:6] = torch.tensor([0.0, -0.0, 1e-4, -1e-4, 1e-3, -2e-3])
    return w.to(dtype)


# (out, in): full blocks; n = 2145 not a multiple of 64 (and an odd row); one partial block (n < 64,
# the nested absmax is 0 - offset = 0); 900 blocks (nested: 3 full blocks of 256 + 132); 257 blocks
# (a last nested block of one absmax); a block of zeros
SHAPES = [(40, 96), (33, 65), (7, 9), (300, 192), (257, 64)]


# ----------------------------------------------------------------------------------------------------
# Quantization against bitsandbytes
# ----------------------------------------------------------------------------------------------------
def test_code_tables_are_bitsandbytes():
    BF = bnb_functional()
    assert torch.equal(dynamic_map(True), BF.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(False), BF.create_dynamic_map(signed=False))
    for qt in ("nf4", "fp4"):
        assert torch.equal(code_4bit(qt), BF.get_4bit_type(qt, device="cpu"))


@pytest.mark.parametrize("n", [256, 1000, 257, 5 * 256])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_8bit_bit_exact(n, signed):
    BF = bnb_functional()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 10 ** torch.randn(n, generator=g)
    x = x if signed else x.abs()
    x[256:512] = 0  # a block of zeros: absmax 0, codes 0
    x[600:700] = torch.linspace(-1, 1, 100)[: x[600:700].numel()] * (1 if signed else 0.5)  # on the LUT grid
    code = dynamic_map(signed)
    q_ref, state = BF.quantize_blockwise(x, code=code, blocksize=256)
    q, absmax = quantize_8bit(x, signed=signed, blocksize=256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, state.absmax)
    assert torch.equal(dequantize_8bit(q, absmax, code), BF.dequantize_blockwise(q_ref, state))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_quantize_4bit_bit_exact(shape, quant_type, double_quant):
    BF = bnb_functional()
    w = weight(shape, seed=sum(shape))
    if shape == (300, 192):
        w[:2] = 0  # three blocks of zeros
    packed_ref, ref = BF.quantize_4bit(
        w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant
    )
    packed, state = quantize_4bit(w, quant_type, blocksize=64, double_quant=double_quant)
    assert packed.dtype == torch.uint8 and packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(state.absmax, ref.absmax) and torch.equal(state.quant_map, ref.code)
    assert state.nested == double_quant
    if double_quant:
        assert state.meta["nested_offset"] == ref.offset.item()
        assert torch.equal(state.nested_absmax, ref.state2.absmax)
        assert torch.equal(state.nested_quant_map, ref.state2.code)
    assert torch.equal(dequantize_4bit(packed, state, torch.float32), BF.dequantize_4bit(packed_ref, ref))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantize_4bit_of_16bit_weights(dtype):
    BF = bnb_functional()
    w = weight((48, 128), seed=3, dtype=dtype)
    packed_ref, ref = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = quantize_4bit(w)
    assert torch.equal(packed, packed_ref) and torch.equal(state.absmax, ref.absmax)
    assert state.dtype == dtype  # the default output dtype, bnb's "dtype" field
    assert torch.equal(dequantize_4bit(packed, state), BF.dequantize_4bit(packed_ref, ref))  # in dtype


def test_nibble_order_first_value_high():
    w = torch.tensor([[-1.0, 1.0] * 32])  # NF4 codes 0 and 15
    packed, _ = quantize_4bit(w, double_quant=False)
    assert packed.view(-1).tolist() == [0x0F] * 32


# ----------------------------------------------------------------------------------------------------
# The Triton kernel (Triton's interpreter without a GPU) against the PyTorch dequantization
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(40, 96), (33, 65), (300, 192)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_triton_dequant_equals_torch_bit_for_bit(shape, quant_type, double_quant):
    packed, state = quantize_4bit(weight(shape, seed=1), quant_type, double_quant=double_quant)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    packed, state = packed.to(dev), state.to(dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = dequantize_4bit_triton(packed, state, torch.empty(shape, dtype=dtype, device=dev))
        ref = state.cpu().dequantize(packed.cpu(), dtype)
        state.to(dev)
        assert torch.equal(out.cpu().view(torch.uint8), ref.view(torch.uint8)), dtype  # bits, -0.0 included


def test_triton_dequant_checks_its_arguments():
    packed, state = quantize_4bit(weight((8, 64)))
    with pytest.raises(ValueError, match="contiguous float32/bfloat16/float16 tensor of 512"):
        dequantize_4bit_triton(packed, state, torch.empty(8, 63))
    with pytest.raises(ValueError, match="uint8 with 256 bytes"):
        dequantize_4bit_triton(packed[:100], state, torch.empty(8, 64))


# ----------------------------------------------------------------------------------------------------
# Linear4bit: forward, gradients, saved tensors, export / import
# ----------------------------------------------------------------------------------------------------
def bnb_linear(w, b, quant_type="nf4", double_quant=True):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=b is not None, compute_dtype=torch.float32,
                              quant_type=quant_type, compress_statistics=double_quant)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type=quant_type,
                                     compress_statistics=double_quant)  # fmt: skip
    if b is not None:
        layer.bias = nn.Parameter(b.clone())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_state_dict_is_bitsandbytes(quant_type, double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    ref = bnb_linear(linear.weight.data, linear.bias.data, quant_type, double_quant)
    ref_sd = ref.state_dict()  # before any forward: bnb's CPU path may repack the weight in place
    ours = Linear4bit.from_linear(linear, quant_type, double_quant=double_quant).state_dict()
    assert list(ours) == list(ref_sd)  # the same keys, in the same order
    for key, value in ref_sd.items():
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
    text = bytes(ours[f"weight.quant_state.bitsandbytes__{quant_type}"].tolist()).decode()
    assert list(json.loads(text))[:4] == ["quant_type", "blocksize", "dtype", "shape"]


def test_linear4bit_forward_equals_dequantized_matmul_and_bitsandbytes():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    x = torch.randn(2, 5, 96)
    layer = Linear4bit.from_linear(linear)
    ref = bnb_linear(linear.weight.data, linear.bias.data)
    w = bnb_functional().dequantize_4bit(ref.weight.data, ref.weight.quant_state)  # before its forward
    assert torch.equal(layer.dequantize(), w)
    y = layer(x)
    assert torch.equal(y, x @ w.T + linear.bias)  # F.linear: the same GEMM
    assert torch.equal(y, ref(x))


def test_linear4bit_gradcheck_float64_and_only_packed_state_saved():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(24, 10))
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    bias = layer.bias.detach().double().requires_grad_()
    f = lambda x, b: Linear4bitFunction.apply(x, layer.weight, b, layer.quant_state)
    assert torch.autograd.gradcheck(f, (x, bias), eps=1e-6, atol=1e-8)
    w = layer.dequantize(torch.float64)
    dy = torch.randn(3, 10, dtype=torch.float64)
    f(x, bias).backward(dy)
    torch.testing.assert_close(x.grad, dy @ w, rtol=0, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(4, 24, requires_grad=True)).sum().backward()
    assert saved and all(t.dtype == torch.uint8 and t.numel() <= 24 * 10 // 2 for t in saved), [
        (t.dtype, tuple(t.shape)) for t in saved
    ]
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_linear4bit_autocast_and_dtype_moves():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    w32 = layer.dequantize()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, F.linear(x.bfloat16(), w32.bfloat16(), layer.bias.bfloat16()))
    state = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    layer.to(torch.bfloat16)  # the bias is cast, the quantization state is not
    assert layer.bias.dtype == torch.bfloat16 and layer.quant_state.absmax.dtype == torch.uint8
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items() if "quant_state" not in k)
    assert layer.quant_state.dtype == torch.bfloat16 and torch.equal(layer.dequantize(), w32.bfloat16())
    assert layer(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_export_import_round_trip(double_quant):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(65, 33), "fp4", double_quant=double_quant)
    sd = layer.state_dict()
    again = Linear4bit.from_state_dict({f"blk.proj.{k}": v for k, v in sd.items()}, prefix="blk.proj.")
    assert again.quant_state.quant_type == "fp4" and again.quant_state.nested == double_quant
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items())
    other = Linear4bit.from_linear(nn.Linear(65, 33))  # nf4, nested: load_state_dict takes the file's
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize(), layer.dequantize()) and other.quant_state.quant_type == "fp4"
    x = torch.randn(3, 65)
    assert torch.equal(other(x), layer(x))


def _tiny():  # tests/_tiny.py, loaded by its path (pytest's importlib mode puts no test folder on sys.path)
    spec = importlib.util.spec_from_file_location("_tiny", Path(__file__).with_name("_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformers_4bit_checkpoint_loads(tmp_path):
    """A tiny Gemma quantized and saved by transformers + bitsandbytes on the CPU: each 4-bit module's
    tensors load into a Linear4bit whose W equals bitsandbytes' dequantization of the same tensors, and
    minilora's quantization of the float weights gives the same tensors."""
    transformers = pytest.importorskip("transformers")
    BF = bnb_functional()
    from safetensors.torch import load_file

    model = _tiny().hf_tiny("gemma2")
    model.save_pretrained(tmp_path / "fp32")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    q = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    q.save_pretrained(tmp_path / "nf4")  # before any forward (DESIGN.md 8: bnb repacks in place)
    tensors = load_file(tmp_path / "nf4" / "model.safetensors")
    float_weights = dict(model.named_parameters())
    names = sorted({k.rsplit(".weight.", 1)[0] for k in tensors if ".weight.quant_state." in k})
    assert len(names) == 4 * 7  # every projection of every layer; embeddings and norms stay float
    for name in names:
        layer = Linear4bit.from_state_dict(tensors, prefix=name + ".")
        part = {
            k.removeprefix(name + ".weight."): v
            for k, v in tensors.items()
            if k.startswith(name + ".weight.")
        }
        ref = BF.QuantState.from_dict(part, device="cpu")
        assert torch.equal(
            layer.dequantize(torch.float32), BF.dequantize_4bit(tensors[name + ".weight"], ref)
        )
        ours = Linear4bit.from_linear(float_weights[name + ".weight"].detach()).state_dict()
        assert all(torch.equal(v, tensors[f"{name}.{k}"]) for k, v in ours.items()), name


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="unknown 4-bit quant type 'int4'; supported: nf4, fp4"):
        quantize_4bit(torch.randn(8, 64), "int4")
    with pytest.raises(ValueError, match="supported: nf4, fp4"):
        Linear4bit.from_linear(nn.Linear(64, 8), quant_type="af4")
    with pytest.raises(TypeError, match="float32, bfloat16 or float16 weights, got torch.float64"):
        quantize_4bit(torch.randn(8, 64, dtype=torch.float64))
    sd = Linear4bit.from_linear(nn.Linear(64, 8)).state_dict()
    layer = Linear4bit.from_linear(nn.Linear(64, 16))
    message = r"weight: the checkpoint's 4-bit weight is \(8, 64\) but this layer is \(16, 64\); load it into"
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(sd)
    bad = dict(sd, weight=sd["weight"][:100])
    with pytest.raises(
        RuntimeError, match=r"packed 4-bit weight has 100 bytes but a \(8, 64\) weight takes 256"
    ):
        Linear4bit.from_linear(nn.Linear(64, 8)).load_state_dict(bad)
    bad = dict(sd, **{"weight.absmax": sd["weight.absmax"][:3]})
    with pytest.raises(
        ValueError, match=r"weight.absmax: expected torch.uint8 with 8 values .* got torch.uint8 with 3"
    ):
        Linear4bit.from_state_dict(bad)
    key = "weight.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    for change, message in [
        (dict(quant_type="af4"), "quant_type 'af4' \\(minilora reads nf4, fp4\\)"),
        (
            dict(quant_storage="bfloat16"),
            "option\\(s\\) \\['quant_storage'\\] that minilora does not support",
        ),
        (dict(blocksize=48), "blocksize 48"),
        (dict(nested_dtype="float16"), "nested_dtype 'float16'"),
    ]:
        text = json.dumps({**meta, **change}).encode()
        with pytest.raises(ValueError, match="weight: this 4-bit checkpoint has " + message):
            Linear4bit.from_state_dict(dict(sd, **{key: torch.tensor(list(text), dtype=torch.uint8)}))
    no_json = {k: v for k, v in sd.items() if k != key}
    with pytest.raises(ValueError, match="is this a bitsandbytes 4-bit checkpoint"):
        Linear4bit.from_state_dict(no_json)
    missing = Linear4bit.from_linear(nn.Linear(64, 8)).load_state_dict(
        {"weight": sd["weight"], "bias": sd["bias"]}, strict=False
    )
    assert missing.missing_keys == ["weight.quant_state.bitsandbytes__nf4"]
    extra = Linear4bit.from_linear(nn.Linear(64, 8)).load_state_dict(
        dict(sd, **{"weight.foo": torch.zeros(1)}), strict=False
    )
    assert extra.unexpected_keys == ["weight.foo"] and not extra.missing_keys


# ----------------------------------------------------------------------------------------------------
# LoRA on a 4-bit base
# ----------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """Embedding, two blocks of q/v projections and an MLP, and an output head tied to the embedding."""

    def __init__(self, d=64, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                dict(q_proj=nn.Linear(d, d), v_proj=nn.Linear(d, d, bias=False), up_proj=nn.Linear(d, 96))
            )
            for _ in range(2)
        )
        self.down_proj = nn.Linear(96, d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = h + layer["v_proj"](torch.tanh(layer["q_proj"](h)))
            h = h + self.down_proj(torch.relu(layer["up_proj"](h)))
        return self.lm_head(h)


def quantized_tiny(seed=0):
    torch.manual_seed(seed)
    model = Tiny()
    names = quantize_model(model, skip=["down_proj"])
    return model, names


def test_quantize_model_keeps_embeddings_and_tied_head():
    torch.manual_seed(0)
    model = Tiny()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = quantize_model(model, skip=["down_proj"])
    assert names == [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "up_proj")]
    assert type(model.down_proj) is nn.Linear and type(model.lm_head) is nn.Linear  # skipped; tied head
    assert model.lm_head.weight is model.embed.weight
    for name in names:
        w = model.get_submodule(name).dequantize()
        assert torch.equal(w, dequantize_4bit(*quantize_4bit(dense[name])))
    keys = model.state_dict().keys()
    assert "layers.0.q_proj.weight.quant_state.bitsandbytes__nf4" in keys and "layers.0.q_proj.bias" in keys
    ml.inject(model, ml.LoRAConfig(r=2, alpha=4, targets=["q_proj"]))
    with pytest.raises(ValueError, match="quantize the base before inject"):
        quantize_model(model)


def test_quantized_gemma_equals_float_gemma_with_dequantized_weights():
    """minilora's own Gemma, quantized: its logits equal those of the float model holding the
    dequantized weights (the same F.linear on the same W), and its LoRA adapters train."""
    from minilora.gemma import Gemma, GemmaConfig

    torch.manual_seed(0)
    cfg = GemmaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, sandwich_norms=True, qk_norm=True,
        sliding_window=8, sliding_layers=(True, False),
    )  # fmt: skip
    model = Gemma(cfg)
    names = quantize_model(model)
    assert len(names) == 2 * 7 and isinstance(model.model.embed_tokens, nn.Embedding)
    reference = Gemma(cfg)
    reference.load_state_dict(ml.merged_state_dict(model), strict=False)  # dense W, quantized values
    ids = torch.randint(0, 96, (2, 12))
    assert torch.equal(model(ids), reference(ids))
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    opt = AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_lora_over_linear4bit_is_the_equation():
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 48))
    w, b = base.dequantize(), base.bias.detach().clone()
    layer = ml.LoRALinear(base, r=4, alpha=8, adapter_dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32 and layer.weight is base.weight
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 64)
    expected = x @ w.T + b + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with ml.disabled(layer):
        assert torch.equal(layer(x), base(x))
    assert ml.LoRALinear(Linear4bit.from_linear(nn.Linear(64, 8).bfloat16()), r=2, alpha=2,
                         adapter_dtype=None).lora_A.dtype == torch.bfloat16  # fmt: skip


def test_lora_over_linear4bit_trains_only_the_adapter_and_refuses_merge():
    model, _ = quantized_tiny()
    names = ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "up_proj"]))
    trainable, _ = ml.count_parameters(model)
    assert trainable == 2 * (4 * (64 + 64) + 4 * (64 + 96))  # as over nn.Linear
    model(torch.randint(0, 50, (2, 7))).square().mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    with pytest.raises(ValueError, match=r"layers.0.q_proj: cannot merge into a 4-bit base weight: .* "
                       r"Use minilora.merged_state_dict\(model\)"):  # fmt: skip
        ml.merge(model)
    assert not any(m.merged for m in model.modules() if isinstance(m, ml.LoRALinear))


def test_merged_state_dict_dequantizes_and_merges():
    model, _ = quantized_tiny()
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    sd = ml.merged_state_dict(model)
    assert not any(".weight." in k or "lora_" in k for k in sd)
    q = model.layers[0]["q_proj"]
    w = q.quant_state.dequantize(q.weight)
    assert sd["layers.0.q_proj.weight"].dtype == torch.float32
    assert torch.equal(sd["layers.0.q_proj.weight"], (w + q.scaling * q.lora_B @ q.lora_A))
    assert torch.equal(sd["layers.1.v_proj.weight"], model.layers[1]["v_proj"].dequantize())  # no LoRA
    dense = Tiny()
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: loaded through the embedding
    ids = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(dense(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_adapter_save_load_and_state_dict_keys_over_4bit(tmp_path):
    model, _ = quantized_tiny()
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    ml.save_adapter(model, tmp_path)
    fresh, _ = quantized_tiny()
    ml.load_adapter(fresh, tmp_path)  # wraps the Linear4bit modules itself
    assert torch.equal(fresh(ids), model(ids))
    # The injected model keeps the 4-bit checkpoint's keys (q_proj.weight, q_proj.weight.absmax, ...)
    plain, _ = quantized_tiny()
    sd = model.state_dict()
    assert set(sd) == set(plain.state_dict()) | {f"layers.{i}.{p}.lora_{ab}" for i in range(2)
                                                  for p in ("q_proj", "v_proj") for ab in "AB"}  # fmt: skip
    other, _ = quantized_tiny(seed=3)
    ml.inject(other, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    other.load_state_dict(sd)
    assert torch.equal(other(ids), model(ids))


# ----------------------------------------------------------------------------------------------------
# 8-bit AdamW
# ----------------------------------------------------------------------------------------------------
def mlp(seed=0):
    """A 2-layer MLP regression: weights of 8192 and 4096 values (8-bit moments), biases of 128 and
    32 (< min_8bit_size: float32 moments, as bitsandbytes keeps them)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


X = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
Y = torch.sin(X @ torch.randn(64, 32, generator=torch.Generator().manual_seed(1)) / 4)


def train(model, opt, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        i = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(step))
        loss = F.mse_loss(model(X[i]), Y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_adamw8bit_equals_bitsandbytes_and_tracks_adamw():
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs, full = mlp(), mlp(), mlp()
    opt = AdamW8bit(ours.parameters(), lr=3e-3)
    ref = bnb.optim.AdamW8bit(theirs.parameters(), lr=3e-3)
    loss_ours, loss_theirs = train(ours, opt, 200), train(theirs, ref, 200)
    loss_full = train(full, torch.optim.AdamW(full.parameters(), lr=3e-3), 200)
    # Tolerance 0: the same float32 operations in the same order on the same device
    assert loss_ours == loss_theirs
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)
        s, r = opt.state[p], ref.state[q]
        assert s["step"] == r["step"] == 200
        if p.numel() >= 4096:
            assert s["exp_avg"].dtype == torch.uint8
            assert torch.equal(s["exp_avg"], r["state1"]) and torch.equal(s["exp_avg_sq"], r["state2"])
            assert torch.equal(s["exp_avg_absmax"], r["absmax1"]) and torch.equal(
                s["exp_avg_sq_absmax"], r["absmax2"]
            )
        else:
            assert torch.equal(s["exp_avg"], r["state1"]) and torch.equal(s["exp_avg_sq"], r["state2"])
    # Against float32 AdamW: the moments differ by their 8-bit rounding (at most half a code step,
    # under 1% of the block's absmax for the larger values), which perturbs each update slightly;
    # the loss curves agree within 2% at every step (measured: 0.6% at worst, 0.09% at step 200)
    assert loss_full[-1] < 0.15 * loss_full[0]
    assert all(abs(a - b) <= 0.02 * b for a, b in zip(loss_ours, loss_full, strict=True))


def test_adamw8bit_resume_is_bit_exact():
    model = mlp()
    opt = AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.1)
    train(model, opt, 60)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, 60, start=60)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = AdamW8bit(resumed.parameters(), lr=1.0)  # the group's lr comes from the checkpoint
    opt2.load_state_dict(saved["opt"])
    assert opt2.state[resumed[0].weight]["exp_avg"].dtype == torch.uint8
    train(resumed, opt2, 60, start=60)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "step")


def test_adamw8bit_bf16_parameters_keep_float32_state_through_resume():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 128).bfloat16())
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    opt2 = AdamW8bit([nn.Parameter(p.detach().clone())])
    opt2.load_state_dict(opt.state_dict())
    state = next(iter(opt2.state.values()))
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# GPU: the compiled kernel, the shared buffer, forward and backward on CUDA
# ----------------------------------------------------------------------------------------------------
@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_on_cuda_equals_cpu_reference(dtype):
    torch.manual_seed(0)
    layers = [Linear4bit.from_linear(nn.Linear(k, n)) for k, n in ((256, 384), (384, 256))]
    x = torch.randn(37, 256)
    w = [layer.dequantize(dtype) for layer in layers]  # CPU, PyTorch
    for layer in layers:
        layer.to("cuda")
    assert all(torch.equal(layer.dequantize(dtype).cpu(), wi) for layer, wi in zip(layers, w, strict=True))
    xc = x.to("cuda", dtype).requires_grad_()
    y = layers[1](torch.relu(layers[0](xc)))  # the second layer's W reuses the first's buffer
    y.float().square().sum().backward()
    xr = x.to(dtype).to(torch.float64).requires_grad_()  # the same rounded input: relu's kinks agree
    yr = F.linear(torch.relu(F.linear(xr, w[0].double(), layers[0].bias.cpu().double())), w[1].double(),
                  layers[1].bias.cpu().double())  # fmt: skip
    yr.square().sum().backward()
    for got, ref in ((y, yr), (xc.grad, xr.grad)):
        if dtype == torch.float32:
            torch.testing.assert_close(got.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-4)
        else:  # two GEMMs with 16-bit operands and outputs: a few units of 2^-8 over the tensor
            rel = ((got.double().cpu() - ref).norm() / ref.norm()).item()
            assert rel < 1e-2, rel
