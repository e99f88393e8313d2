"""LoRALinear: the equation, its gradients (float64 gradcheck), init, merge/unmerge, state-dict keys."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import minilora as ml


def make_layer(bias=True, r=4, alpha=8.0, rslora=False, dtype=torch.float64, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(7, 5, bias=bias, dtype=dtype)
    layer = ml.LoRALinear(base, r=r, alpha=alpha, use_rslora=rslora, dropout=dropout, adapter_dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would make every gradient check w.r.t. A trivial
    return base, layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_gradcheck_input_A_B(bias, rslora):
    _, layer = make_layer(bias=bias, rslora=rslora)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)

    def f(x, A, B):
        return functional_call(layer, {"lora_A": A, "lora_B": B}, (x,))

    assert torch.autograd.gradcheck(f, (x, A, B), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_the_equation(rslora):
    base, layer = make_layer(rslora=rslora, r=4, alpha=8.0)
    x = torch.randn(3, 7, dtype=torch.float64)
    scaling = 8.0 / (math.sqrt(4) if rslora else 4)
    assert layer.scaling == scaling
    expected = x @ base.weight.T + base.bias + scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.delta_weight().double(), scaling * layer.lora_B @ layer.lora_A)


def test_init_kaiming_and_gaussian_and_zero_B():
    torch.manual_seed(0)
    layer = ml.LoRALinear(nn.Linear(400, 300), r=16, alpha=16)
    assert layer.lora_A.dtype == torch.float32 and layer.lora_B.dtype == torch.float32
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(400)  # kaiming_uniform(a=sqrt(5)) on fan_in=400
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    g = ml.LoRALinear(nn.Linear(400, 300), r=16, alpha=16, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 16) < 0.005


def test_fresh_layer_equals_base_exactly():
    base = nn.Linear(64, 32)
    x = torch.randn(4, 64)
    ref = base(x)
    layer = ml.LoRALinear(base, r=8, alpha=16)
    assert torch.equal(layer(x), ref)


def test_dropout_only_on_adapter_path_and_only_in_training():
    _, layer = make_layer(dropout=0.5)
    x = torch.randn(64, 7, dtype=torch.float64)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(
        y_eval, x @ layer.weight.T + layer.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
    )
    layer.train()
    torch.manual_seed(1)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    with ml.disabled(layer):  # the base path never sees dropout
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_base_frozen_adapter_trainable_and_state_dict_keys():
    base = nn.Linear(6, 4)
    base_keys = set(base.state_dict())
    layer = ml.LoRALinear(base, r=2, alpha=4)
    assert layer.weight is base.weight and layer.bias is base.bias  # same Parameters, no copy
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert set(layer.state_dict()) == base_keys | {"lora_A", "lora_B"}
    # A base checkpoint loads by its own keys.
    sd = {k: torch.randn_like(v) for k, v in base.state_dict().items()}
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(layer.weight, sd["weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge(dtype):
    torch.manual_seed(0)
    base = nn.Linear(48, 40).to(dtype)
    w0 = base.weight.detach().clone()
    layer = ml.LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(5, 48).to(dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    expected_w = (w0.float() + layer.scaling * layer.lora_B.float() @ layer.lora_A.float()).to(dtype)
    assert torch.equal(layer.weight, expected_w)  # float32 sum, rounded once
    merged_w = layer.weight.detach().clone()
    layer.merge()  # merging twice is a no-op
    assert torch.equal(layer.weight, merged_w)
    # Forward after merge equals forward before it within the rounding of the merged weight.
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)
    layer.unmerge()
    assert not layer.merged
    assert torch.equal(
        layer.weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
        w0.view(torch.int16 if dtype != torch.float32 else torch.int32),
    )
    layer.unmerge()  # unmerging twice is a no-op
    assert torch.equal(layer.weight, w0)
    assert torch.equal(layer(x), y)


def test_merge_refuses_non_finite_update():
    _, layer = make_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN/Inf"):
        layer.merge()
    assert torch.equal(layer.weight, w) and not layer.merged


def test_merge_checks_the_rounded_weight_not_just_the_update():
    # A finite float32 update whose sum with W overflows float16 (max 65504) must not merge to inf.
    base = nn.Linear(4, 4, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(60000.0)
    layer = ml.LoRALinear(base, r=1, alpha=1)
    with torch.no_grad():
        layer.lora_A.fill_(100.0)
        layer.lora_B.fill_(100.0)  # dW = 1e4 everywhere, finite in float32
    assert torch.isfinite(layer.delta_weight()).all()
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"NaN/Inf values in the torch.float16 base weight"):
        layer.merge()
    assert torch.equal(layer.weight, w) and not layer.merged


def test_float64_base_merges_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(48, 40, dtype=torch.float64)
    w0 = base.weight.detach().clone()
    layer = ml.LoRALinear(base, r=4, alpha=8)  # float32 adapters (the default)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    assert layer.delta_weight().dtype == torch.float64
    x = torch.randn(5, 48, dtype=torch.float64)
    y = layer(x)
    layer.merge()
    expected = w0 + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    assert torch.equal(layer.weight, expected)  # not rounded through float32
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-12)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


def test_bf16_base_fp32_adapter_grads_reach_fp32_params():
    torch.manual_seed(0)
    layer = ml.LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.dtype == torch.float32
    assert layer.weight.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0, alpha=8), "LoRALinear: r must be a positive integer, got 0"),
        (dict(r=-2, alpha=8), "r must be a positive integer"),
        (dict(r=4, alpha=0), "alpha must be a number > 0"),
        (dict(r=4, alpha=8, dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(r=4, alpha=8, dropout=-0.1), r"dropout must be a number in \[0, 1\)"),
        (dict(r=4, alpha=8, init="xavier"), "init must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ml.LoRALinear(nn.Linear(4, 4), **kwargs)


def test_wraps_only_linear():
    with pytest.raises(TypeError, match="wraps an nn.Linear, got Embedding"):
        ml.LoRALinear(nn.Embedding(4, 4), r=2, alpha=2)


def test_backend_switch_validates():
    with pytest.raises(ValueError, match="unknown backend"):
        ml.set_backend("cuda")
    assert ml.get_backend() in ("auto", "torch", "triton")
