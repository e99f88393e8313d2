"""minilora.gemma against Hugging Face transformers (the test-only oracle) on tiny random checkpoints:
logits, loss, parameter counts, config dialects, strict loading, gradient checkpointing."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import minilora as ml
from minilora import checkpoint as ckpt
from minilora import gemma
from minilora.inject import lora_layers

transformers = pytest.importorskip("transformers")

# tests/_tiny.py, loaded by its path: pytest's importlib mode puts no test folder on sys.path (and
# `from tests._tiny import ...` works only from pytest 8.3 on).
_spec = importlib.util.spec_from_file_location("_tiny", Path(__file__).with_name("_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
KINDS, VOCAB, hf_tiny = _tiny.KINDS, _tiny.VOCAB, _tiny.hf_tiny

# The real config.json files of the seeds' checkpoints (vendored, so the parameter-count acceptance
# tests always run); MINILORA_CONFIGS points at another folder of them.
CONFIGS = os.environ.get("MINILORA_CONFIGS", os.path.join(os.path.dirname(__file__), "configs"))


def checkpoint(tmp_path, kind: str, name: str = "ckpt", **save_kwargs):
    model = hf_tiny(kind)
    path = tmp_path / name
    model.save_pretrained(path, **save_kwargs)
    return model, path


def real_config(name: str) -> dict:
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
        return json.load(f)


def config_of(name: str) -> gemma.GemmaConfig:
    return ckpt.config_from_hf(real_config(name))


def ids_for(B=2, T=13, seed=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("kind", list(KINDS))
def test_float32_logits_match_transformers(tmp_path, kind):
    hf, path = checkpoint(tmp_path, kind)
    model = gemma.from_pretrained(path)
    ids = ids_for(T=13)  # 13 > sliding window 5: the window actually cuts
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 13, VOCAB)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kind, key, approximate",
    [("gemma1-mqa", "hidden_act", "tanh"), ("gemma2", "hidden_activation", "none"),
     ("gemma3", "hidden_activation", "none")],
)  # fmt: skip
def test_gelu_means_what_transformers_makes_of_it(tmp_path, kind, key, approximate):
    # Gemma 1's legacy "gelu" is rewritten to the tanh form; Gemma 2/3 run "gelu" as the exact GELU.
    hf = hf_tiny(kind, **{key: "gelu"})
    hf.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())[key] in ("gelu", "gelu_pytorch_tanh")
    model = gemma.from_pretrained(tmp_path / "m")
    assert model.config.gelu_approximate == approximate
    ids = ids_for()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    hf, single = checkpoint(tmp_path, "gemma3", "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    a, b = gemma.from_pretrained(single), gemma.from_pretrained(tmp_path / "sharded")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)
    with torch.no_grad():
        torch.testing.assert_close(b(ids_for()), hf(ids_for()).logits, atol=1e-4, rtol=0)


def test_state_dict_keys_are_the_checkpoint_keys(tmp_path):
    _, path = checkpoint(tmp_path, "gemma3")
    model = gemma.from_pretrained(path)
    assert set(model.state_dict()) == set(load_file(path / "model.safetensors"))
    assert not hasattr(model, "lm_head")
    assert model.name_or_path == str(path) and model.config.qk_norm  # read as Gemma 3


@pytest.mark.parametrize("kind", ["gemma1-mqa", "gemma2", "gemma3"])
def test_bfloat16_logits_match_transformers(tmp_path, kind):
    # Both implementations round the same float32 math to bf16 (8-bit mantissa) after every op,
    # but in different orders (SDPA vs matmul-then-scale, fused vs separate products), so they
    # cannot agree bit for bit. The bound: ours is no further from the float32 result, and no
    # further from transformers' bf16, than twice transformers' own bf16 error. Measured here:
    # ratios 0.5 to 1.5, errors 0.01 to 0.04 on logits of magnitude 1.5 to 4.
    hf, path = checkpoint(tmp_path, kind)
    ids = ids_for(T=12)
    with torch.no_grad():
        reference = hf(ids).logits.float()
        theirs = hf.to(torch.bfloat16)(ids).logits.float()
        ours = gemma.from_pretrained(path, dtype=torch.bfloat16)(ids)
    their_error = (theirs - reference).abs().max()
    assert 0 < their_error < 0.1
    assert (ours - reference).abs().max() <= 2 * their_error
    assert (ours - theirs).abs().max() <= 2 * their_error


# --------------------------------------------------------------------------------------------
# Config dialects


def test_transformers4_dialect_gives_the_same_model(tmp_path):
    hf, path = checkpoint(tmp_path, "gemma3-linear8")
    v5 = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in v5 and "layer_types" in v5
    old = tmp_path / "v4"
    shutil.copytree(path, old)
    v4 = {
        k: v for k, v in v5.items() if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")
    }
    v4.update(rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6,
              rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip
    (old / "config.json").write_text(json.dumps(v4))
    a, b = gemma.from_pretrained(path), gemma.from_pretrained(old)
    assert a.config == b.config
    with torch.no_grad():
        torch.testing.assert_close(b(ids_for()), hf(ids_for()).logits, atol=1e-4, rtol=0)


def test_rope_scaling_applies_to_full_layers_only():
    c = config_of("gemma-3-270m.json")
    assert (c.rope_theta, c.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    assert (c.rope_scaling_factor, c.rope_local_scaling_factor) == (1.0, 1.0)
    hf = real_config("gemma-3-270m.json")
    c = ckpt.config_from_hf({**hf, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})
    assert (c.rope_scaling_factor, c.rope_local_scaling_factor) == (8.0, 1.0)


@pytest.mark.parametrize(
    "name, sliding, expected",
    [
        ("gemma-7b.json", None, dict(qk_norm=False, sandwich_norms=False, query_pre_attn_scalar=256)),
        ("gemma-2-9b.json", 4096,
         dict(sandwich_norms=True, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
        ("gemma-3-1b-it.json", 512, dict(qk_norm=True, sandwich_norms=True)),
    ],
)  # fmt: skip
def test_real_configs(name, sliding, expected):
    c = config_of(name)
    assert c.sliding_window == sliding
    for key, value in expected.items():
        assert getattr(c, key) == value, key
    n = c.num_hidden_layers
    pattern = {
        "gemma": [False] * n,
        "gemma2": [i % 2 == 0 for i in range(n)],
        "gemma3_text": [(i + 1) % 6 != 0 for i in range(n)],
    }[real_config(name)["model_type"]]
    assert list(c.sliding_layers) == pattern


def test_layer_types_decide_which_layers_slide():
    hf = real_config("gemma-3-270m.json")
    types = ["full_attention"] * 17 + ["sliding_attention"]
    c = ckpt.config_from_hf({**hf, "layer_types": types})
    assert c.sliding_layers == (False,) * 17 + (True,)


def test_multimodal_gemma3_config_uses_text_config():
    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024}  # fmt: skip
    c = ckpt.config_from_hf({"model_type": "gemma3", "text_config": text, "vision_config": {}})
    # Absent keys take transformers' Gemma3TextConfig defaults, as the hub file relies on.
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (8, 4, 256, 262208)
    assert (c.rope_theta, c.rope_scaling_factor, c.rope_local_base_freq) == (1e6, 8.0, 1e4)
    assert c.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(34))
    defaults = transformers.Gemma3TextConfig()
    assert (c.vocab_size, c.num_attention_heads) == (defaults.vocab_size, defaults.num_attention_heads)


def test_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path):
    hf, path = checkpoint(tmp_path, "gemma3")
    text_config = json.loads((path / "config.json").read_text())
    mm = tmp_path / "mm"
    mm.mkdir()
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_config}))
    tensors = {"language_model." + k: v for k, v in load_file(path / "model.safetensors").items()}
    tensors["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    tensors["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(4, 64)
    save_file(tensors, mm / "model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(
            gemma.from_pretrained(mm)(ids_for()), hf(ids_for()).logits, atol=1e-4, rtol=0
        )


# --------------------------------------------------------------------------------------------
# Parameter counts on the meta device (DESIGN.md section 5)

COUNTS = {
    "gemma-7b.json": 8_537_680_896,
    "codegemma-7b.json": 8_537_680_896,
    "gemma-2b.json": 2_506_172_416,
    "gemma-2-9b.json": 9_241_705_984,
    "gemma-3-1b-it.json": 999_885_952,
    "gemma-3-270m.json": 268_098_176,
}


def meta_model(tmp_path, name):
    (tmp_path / name).mkdir()
    shutil.copy(os.path.join(CONFIGS, name), tmp_path / name / "config.json")
    return gemma.from_pretrained(tmp_path / name, device="meta")


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_count_on_meta(tmp_path, name):
    model = meta_model(tmp_path, name)
    assert all(p.is_meta for p in model.parameters())
    assert ml.count_parameters(model) == (COUNTS[name], COUNTS[name])
    # Cross-check with transformers' own model of the same config, also on meta.
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(tmp_path / name)
        )
    assert sum(p.numel() for p in ref.parameters()) == COUNTS[name]


@pytest.mark.parametrize(
    "name, r, targets, expected",
    [
        ("gemma-3-1b-it.json", 16, ["k_proj", "v_proj"], 1_171_456),
        ("gemma-3-1b-it.json", 16, ["q_proj", "k_proj", "v_proj", "o_proj"], 2_981_888),
        ("gemma-3-1b-it.json", 8, ["q_proj", "k_proj", "v_proj", "o_proj"], 1_490_944),
        ("gemma-7b.json", 4, ["q_proj", "k_proj", "v_proj"], 2_408_448),
        ("gemma-2-9b.json", 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
         54_018_048),
    ],
)  # fmt: skip
def test_lora_trainable_counts_on_meta(tmp_path, name, r, targets, expected):
    model = meta_model(tmp_path, name)
    names = ml.inject(model, ml.LoRAConfig(r=r, alpha=2 * r, targets=targets))
    assert len(names) == len(targets) * model.config.num_hidden_layers
    assert ml.count_parameters(model) == (expected, COUNTS[name] + expected)
    # The same figure from first principles: r * (in + out) per adapted projection.
    assert expected == sum(r * (m.in_features + m.out_features) for _, m in lora_layers(model))


# --------------------------------------------------------------------------------------------
# Loss, gradients, padding, gradient checkpointing


def test_loss_matches_transformers_with_ignored_labels(tmp_path):
    hf, path = checkpoint(tmp_path, "gemma2")  # final soft-capping applies in the loss path too
    model = gemma.from_pretrained(path)
    ids = ids_for(T=11)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[1, 7:] = -100  # right padding
    with torch.no_grad():
        expected = hf(ids, labels=labels).loss
        got = model(ids, labels)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_loss_without_any_label_is_a_zero_that_backpropagates(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    model = gemma.from_pretrained(path)
    loss = model(ids_for(), torch.full((2, 13), -100))
    loss.backward()
    assert loss.item() == 0.0


def lora_model(path, dropout=0.0):
    model = gemma.from_pretrained(path)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, dropout=dropout, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(0.0, 0.05)  # B = 0 would make every gradient of A zero
    return model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_labels_path_gradient_equals_full_logits_path(tmp_path):
    _, path = checkpoint(tmp_path, "gemma3")
    model = lora_model(path)
    ids = ids_for(T=11)
    labels = ids.clone()
    labels[0, :5] = -100
    model(ids, labels).backward()
    ours = lora_grads(model)
    model.zero_grad()
    logits = model(ids)[:, :-1]  # full (B, T-1, vocab) logits, the textbook loss
    F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100).backward()
    full = lora_grads(model)
    assert set(ours) == set(full) and all(n.endswith(("lora_A", "lora_B")) for n in ours)
    for name in ours:
        torch.testing.assert_close(ours[name], full[name], atol=1e-6, rtol=1e-4, msg=name)


def test_compiled_norms_give_the_eager_loss_and_gradients(tmp_path):
    """compile_norms (inductor's fused RMSNorm) against eager, float32: the same loss and LoRA
    gradients up to the order of the fused reductions (measured: ~1e-6 of each gradient's largest
    value, 3e-8 at 3e-2; elementwise near-zero entries differ by more than 1e-5 of themselves)."""
    _, path = checkpoint(tmp_path, "gemma3")
    model = lora_model(path)
    ids = ids_for(T=11)
    labels = ids.clone()
    labels[:, :4] = -100
    eager = model(ids, labels)
    eager.backward()
    expected = lora_grads(model)
    model.zero_grad()
    assert gemma.compile_norms(model) == 7 * 4 + 7 * 2 + 1  # four per layer, q/k norms, the final one
    compiled = model(ids, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    for name, grad in lora_grads(model).items():
        scale = float(expected[name].abs().max())
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


class HeadRows(TorchDispatchMode):
    """Records the rows of every matrix product whose output is vocabulary-wide: the output head's
    (rows, vocab), or (vocab, rows) where the CPU's fused loss computes (W h^T)^T."""

    def __init__(self):
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aten = torch.ops.aten
        if func.overloadpacket in (aten.mm, aten.addmm, aten.bmm, aten.matmul) and VOCAB in out.shape[-2:]:
            self.rows.append(out.numel() // VOCAB)
        return out


def test_output_head_runs_only_at_labelled_positions(tmp_path):
    _, path = checkpoint(tmp_path, "gemma2")
    model = gemma.from_pretrained(path)
    ids = ids_for(B=2, T=11)
    labels = ids.clone()
    labels[0, :7] = -100  # a long masked prompt
    labels[1, 9:] = -100  # right padding
    with torch.no_grad(), HeadRows() as full:
        model(ids)
    assert full.rows == [2 * 11]  # the recorder sees the head: every position without labels
    with torch.no_grad(), HeadRows() as labelled:
        model(ids, labels)
    # Position t predicts labels[t + 1]: (11 - 7) + (9 - 1) = 12 positions carry a label.
    assert labelled.rows == [int((labels[:, 1:] != -100).sum())] == [12]


def test_right_padding_does_not_change_earlier_positions(tmp_path):
    _, path = checkpoint(tmp_path, "gemma2")
    model = gemma.from_pretrained(path)
    ids = ids_for(B=1, T=9)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :9], model(ids), atol=1e-5, rtol=0)
    labels = padded.clone()
    labels[:, 9:] = -100
    with torch.no_grad():
        torch.testing.assert_close(model(padded, labels), model(ids, ids), atol=1e-6, rtol=0)


def test_gradient_checkpointing_gives_the_same_loss_and_lora_grads(tmp_path):
    _, path = checkpoint(tmp_path, "gemma3")
    model = lora_model(path, dropout=0.1)  # dropout: the recomputation must replay the same masks
    model.train()
    ids = ids_for(T=11)
    torch.manual_seed(3)
    plain = model(ids, ids)
    plain.backward()
    expected = lora_grads(model)
    model.zero_grad()
    model.gradient_checkpointing = True
    torch.manual_seed(3)
    recomputed = model(ids, ids)
    recomputed.backward()
    torch.testing.assert_close(recomputed, plain, atol=0, rtol=0)
    got = lora_grads(model)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-7, rtol=1e-5, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


# --------------------------------------------------------------------------------------------
# Attention in query blocks, packed rows


def dense_attention(q, k, v, window, scale, cap, seg=None):
    """The textbook (T, T) attention: the reference for the blocked one."""
    T, rep = q.shape[2], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, T, hd)
    att = gemma.softcap(q @ k.transpose(-2, -1) * scale, cap)  # (B, nh, T, T)
    mask = gemma.attention_mask(0, T, 0, T, window, q.device)
    if seg is not None:
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 2.0])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_attention_equals_the_dense_reference(monkeypatch, window, cap, packed):
    monkeypatch.setattr(gemma, "ATTN_BLOCK", 4)  # 13 queries: blocks of 4, 4, 4, 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    seg = torch.tensor([[1] * 6 + [2] * 7, [1] * 2 + [2] * 9 + [3] * 2]) if packed else None
    got = gemma.attend(q, k, v, 0, 0, window, 0.3, cap, seg)
    want = dense_attention(q, k, v, window, 0.3, cap, seg)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    dy = torch.randn(want.shape, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v), dy), torch.autograd.grad(want, (q, k, v), dy), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Shapes(TorchDispatchMode):
    """The shapes of every tensor the ops produce."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor)]  # fmt: skip
        return out


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_attention_never_builds_a_T_by_T_tensor_and_matches_transformers(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gemma, "ATTN_BLOCK", 8)
    hf, path = checkpoint(tmp_path, kind)
    model = lora_model(path)
    model.gradient_checkpointing = True
    ids = ids_for(B=1, T=70)  # window 5, blocks of 8: 70 is neither's multiple
    with Shapes() as seen:
        model(ids, ids).backward()
    assert (70, 70) not in {s[-2:] for s in seen.shapes}  # (T, T) scores or mask
    with torch.no_grad(), ml.disabled(model):
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_packed_row_equals_its_examples_alone(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gemma, "ATTN_BLOCK", 4)
    _, path = checkpoint(tmp_path, kind)
    model = gemma.from_pretrained(path)
    lengths = [7, 12, 5]  # windows cut inside the examples, blocks straddle them
    parts = [ids_for(B=1, T=n, seed=n)[0] for n in lengths]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, 24)
    cuts = torch.tensor([0, *lengths]).cumsum(0).tolist()
    with torch.no_grad():
        packed = model(torch.cat(parts)[None], positions=positions)[0]  # (24, vocab)
        for part, a, b in zip(parts, cuts, cuts[1:], strict=False):
            torch.testing.assert_close(packed[a:b], model(part[None])[0], atol=1e-5, rtol=0)
            labels = torch.full((1, 24), -100)
            labels[0, a + 1 : b] = part[1:]  # this example's loss alone, in the packed row
            loss = model(torch.cat(parts)[None], labels, positions=positions)
            torch.testing.assert_close(loss, model(part[None], part[None]), atol=1e-6, rtol=0)
        parts[1] = (parts[1] + 1) % VOCAB  # another middle example: the others see no change
        perturbed = model(torch.cat(parts)[None], positions=positions)[0]
    assert not torch.allclose(perturbed[7:19], packed[7:19])
    torch.testing.assert_close(perturbed[:7], packed[:7], atol=0, rtol=0)
    torch.testing.assert_close(perturbed[19:], packed[19:], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("kind", ["gemma1-mqa", "gemma2", "gemma3"])
def test_kv_cache_equals_full_recompute_and_trims_sliding_layers(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(gemma, "ATTN_BLOCK", 4)  # the prefill of 7 goes in two query blocks
    _, path = checkpoint(tmp_path, kind)
    model = gemma.from_pretrained(path)
    ids = ids_for(B=2, T=15)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        # prefill longer than the window, then a chunk of 3, then one token at a time
        steps = [model(ids[:, :7], cache=cache), model(ids[:, 7:10], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(10, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.seen == 15
    window = model.config.sliding_window
    for i, sliding in enumerate(model.config.sliding_layers):
        assert cache.stored(i) == (window - 1 if sliding else 15)


# --------------------------------------------------------------------------------------------
# Bad input


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gemma.from_pretrained(tmp_path / "nope")


def test_a_file_instead_of_the_folder(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    with pytest.raises(NotADirectoryError, match="model.safetensors' is a file; pass the checkpoint folder"):
        gemma.from_pretrained(path / "model.safetensors")


def test_invalid_config_json_is_named(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    (path / "config.json").write_text('{"model_type": "gemma",\n}')
    with pytest.raises(ValueError, match=r"ckpt/config.json is not valid JSON \(Expecting"):
        gemma.from_pretrained(path)
    with pytest.raises(ValueError, match=r"ckpt/config.json is not valid JSON"):
        ckpt.read_json(path / "config.json")


def test_no_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        gemma.from_pretrained(tmp_path)


def test_no_weights(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    os.remove(path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        gemma.from_pretrained(path)
    assert gemma.from_pretrained(path, device="meta").config.num_hidden_layers == 2


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="model_type 'llama' is not a Gemma text model"):
        gemma.from_pretrained(tmp_path)


def test_unsupported_rope_type():
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        ckpt.config_from_hf({"model_type": "gemma", "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    _, path = checkpoint(tmp_path, "gemma3")
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(
        ValueError, match=r"missing tensors \(1\): \['model.layers.1.self_attn.k_norm.weight'\]"
    ):
        gemma.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    rewrite_weights(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \(1\): \['model.layers.0.mlp.extra.weight'\]"):
        gemma.from_pretrained(path)


def test_shape_mismatch_names_both_shapes(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    rewrite_weights(path, lambda t: t.update({"model.norm.weight": torch.zeros(65)}))
    with pytest.raises(
        ValueError, match=r"model.norm.weight: checkpoint shape \(65,\), model expects \(64,\)"
    ):
        gemma.from_pretrained(path)


def safetensors_header(file) -> dict:
    """name -> dtype, shape, data_offsets of a .safetensors file, read by hand (the format's spec)."""
    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    return header


def test_corrupted_safetensors_header_names_the_file(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[8:12] = b"#!?@"  # the header's JSON, broken at the same length
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors: the safetensors header is corrupted"):
        gemma.from_pretrained(path)
    (path / "model.safetensors").write_bytes(bytes(raw[:100]))  # cut inside the header
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors is truncated inside its header"):
        gemma.from_pretrained(path)
    (path / "model.safetensors").write_bytes(b"\x01\x00")  # not even the header's length
    with pytest.raises(ValueError, match=r"ckpt/model.safetensors is not a safetensors file \(2 bytes"):
        gemma.from_pretrained(path)


def sharded(tmp_path):
    hf, path = checkpoint(tmp_path, "gemma3", max_shard_size="100KB")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 2
    return hf, path, shards


def test_truncated_shard_names_the_tensor_and_the_file(tmp_path):
    _, path, shards = sharded(tmp_path)
    shard = shards[1]
    header = safetensors_header(shard)
    last = max(header, key=lambda name: header[name]["data_offsets"][1])
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 3)  # the last tensor loses its last bytes
    with pytest.raises(
        ValueError, match=rf"{shard.name} is truncated: tensor {last} ends at byte {size} but the file has"
    ):
        gemma.from_pretrained(path)


def test_index_entry_for_a_shard_without_the_tensor(tmp_path):
    _, path, shards = sharded(tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    stored = index["weight_map"]
    wrong = next(s.name for s in shards if s.name != stored["model.norm.weight"])
    index["weight_map"] = {**stored, "model.norm.weight": wrong}
    index_file.write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=rf"{wrong} does not contain model.norm.weight, which the index maps"
    ):
        gemma.from_pretrained(path)
    # The tied head's entry is checked the same way (it used to be a bare KeyError).
    index["weight_map"] = {**stored, "lm_head.weight": wrong}
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{wrong} does not contain lm_head.weight, which the index maps"):
        gemma.from_pretrained(path)


def test_stored_lm_head_must_equal_the_embedding(tmp_path):
    hf, path = checkpoint(tmp_path, "gemma1-mqa")
    embedding = hf.model.embed_tokens.weight.detach().clone()
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": embedding.clone()}))
    gemma.from_pretrained(path)  # a tied copy is accepted
    rewrite_weights(path, lambda t: t.update({"lm_head.weight": embedding + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embed_tokens.weight"):
        gemma.from_pretrained(path)


def test_dtype_and_device_choices(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    assert gemma.from_pretrained(path).model.embed_tokens.weight.dtype == torch.float32  # auto on CPU
    model = gemma.from_pretrained(path, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype 'float8'"):
        gemma.from_pretrained(path, dtype="float8")


@pytest.mark.parametrize("stored, target", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_dtype_conversion_while_loading_is_exact(tmp_path, monkeypatch, stored, target):
    hf = hf_tiny("gemma3").to(stored)
    hf.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(ckpt, "_CHUNK_BYTES", 1000)  # many chunks per tensor, and a ragged last one
    model = gemma.from_pretrained(tmp_path / "m", dtype=target)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == target and torch.equal(p, theirs[name].to(target)), name


# --------------------------------------------------------------------------------------------
# Issue 9 (6, 7): every value of a checkpoint folder is checked where it is read


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rms_norm_eps", -1, "rms_norm_eps must be a number > 0, got -1"),  # every logit was NaN
        ("rms_norm_eps", 0, "rms_norm_eps must be a number > 0, got 0"),
        ("sliding_window", -5, "sliding_window must be an integer >= 1, got -5"),
        ("num_hidden_layers", 1.5, "num_hidden_layers must be an integer >= 1, got 1.5"),
        ("head_dim", "16", "head_dim must be an integer >= 1, got '16'"),
    ],
)
def test_config_values_out_of_range_are_refused(tmp_path, key, value, message):
    _, path = checkpoint(tmp_path, "gemma3")
    edit_json(path / "config.json", lambda c: c.update({key: value}))
    with pytest.raises(ValueError, match=rf"config.json: {message}"):
        gemma.from_pretrained(path)


@pytest.mark.parametrize("text, kind", [("[1]", "list"), ("null", "NoneType"), ('"gemma"', "str")])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text, kind):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    (path / "config.json").write_text(text)  # used to be AttributeError: 'list' object has no attribute 'get'
    with pytest.raises(ValueError, match=rf"ckpt/config.json holds a JSON {kind}, not an object"):
        gemma.from_pretrained(path)


def test_nan_weights_are_refused(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    rewrite_weights(path, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((3, 4), float("nan")))
    with pytest.raises(ValueError, match=r"tensor model.layers.1.mlp.up_proj.weight holds NaN or infinite"):
        gemma.from_pretrained(path)


def test_a_shard_path_outside_the_model_folder_is_refused(tmp_path):
    _, path, shards = sharded(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(shards[0], outside / shards[0].name)
    index = path / "model.safetensors.index.json"
    moved = lambda v: f"../outside/{v}" if v == shards[0].name else v
    edit_json(index, lambda i: i.update(weight_map={k: moved(v) for k, v in i["weight_map"].items()}))
    with pytest.raises(ValueError, match=r"maps tensors to files outside the model folder: \[\"'../outside/"):
        gemma.from_pretrained(path)


def test_a_header_entry_without_data_offsets_is_named(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    file = path / "model.safetensors"
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    del header["model.norm.weight"]["data_offsets"]  # used to be a bare KeyError
    text = json.dumps(header).encode().ljust(n)
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(ValueError, match=r"header entry of 'model.norm.weight' is malformed .*data_offsets"):
        gemma.from_pretrained(path)


def test_float16_on_a_cpu_warns_why(tmp_path):
    _, path = checkpoint(tmp_path, "gemma1-mqa")
    with pytest.warns(UserWarning, match=r"float16 on a CPU: .* slower .* GPUs without bfloat16"):
        gemma.from_pretrained(path, dtype="float16")
