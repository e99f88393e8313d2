"""inject(): strict matching by name, the model-level merge/unmerge/disabled, parameter reports."""

import pytest
import torch
from torch import nn

import minilora as ml


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x) + self.k_proj(x)) * self.v_proj(x))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn, self.mlp = Attn(d), MLP(d)

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class Body(nn.Module):
    def __init__(self, vocab, d, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(n))


class TinyLM(nn.Module):
    """Hugging Face-like names: model.layers.{i}.self_attn.q_proj, ..., lm_head tied to the embedding."""

    def __init__(self, vocab=50, d=16, n=3):
        super().__init__()
        self.model = Body(vocab, d, n)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(h)


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw)


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


IDS = torch.tensor([[1, 5, 7, 9, 2], [3, 3, 8, 0, 4]])


def test_injected_equals_base_exactly_and_only_lora_trains():
    model = tiny()
    ref = model(IDS)
    names = ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]
    assert torch.equal(model(IDS), ref)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{w}" for n in names for w in ("lora_A", "lora_B")}
    randomize(model)
    model(IDS).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_typo_in_targets_is_an_error_that_suggests_the_real_names():
    model = tiny()
    with pytest.raises(ValueError) as e:
        ml.inject(model, ml.LoRAConfig(targets=["q_prog", "k_proj", "v_proj", "o_prog"]))
    msg = str(e.value)
    assert "q_prog matches nothing; did you mean q_proj" in msg
    assert "o_prog matches nothing; did you mean o_proj" in msg
    assert "k_proj matches" not in msg
    assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())  # nothing half-done


def test_full_dotted_name_and_suffix_on_dot_boundary():
    model = tiny()
    names = ml.inject(model, ml.LoRAConfig(targets=["model.layers.1.mlp.up_proj", "self_attn.o_proj"]))
    assert names == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.2.self_attn.o_proj",
    ]
    with pytest.raises(ValueError, match="proj matches nothing"):
        ml.inject(tiny(), ml.LoRAConfig(targets=["proj"]))  # "q_proj" does not end in ".proj"


def test_regex_target_fullmatches():
    model = tiny()
    names = ml.inject(model, ml.LoRAConfig(targets=r".*\.(q|v)_proj"))
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    with pytest.raises(ValueError, match=r"must fullmatch a dotted name\) matches nothing"):
        ml.inject(tiny(), ml.LoRAConfig(targets=r"q_proj"))  # must fullmatch the dotted name


def test_all_linear_never_takes_the_output_head():
    model = tiny()
    names = ml.inject(model, ml.LoRAConfig(targets="all-linear"))
    assert len(names) == 3 * 7 and "lm_head" not in names
    assert isinstance(model.lm_head, nn.Linear)


def test_exclude_and_layers():
    cfg = ml.LoRAConfig(
        targets=["q_proj", "down_proj"], layers=[0, 2], exclude=["model.layers.2.mlp.down_proj"]
    )
    names = ml.inject(tiny(), cfg)
    assert names == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.2.self_attn.q_proj",
    ]
    names = ml.inject(tiny(), ml.LoRAConfig(targets="all-linear", exclude=r".*mlp\..*"))
    assert len(names) == 12
    with pytest.raises(ValueError, match="layers=\\[7\\] remove all of them"):
        ml.inject(tiny(), ml.LoRAConfig(targets=["q_proj"], layers=[7]))


def test_rank_and_alpha_patterns():
    cfg = ml.LoRAConfig(
        r=4,
        alpha=8,
        targets=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
    )
    model = tiny()
    ml.inject(model, cfg)
    assert model.model.layers[0].self_attn.v_proj.r == 2
    assert model.model.layers[0].self_attn.q_proj.r == 4 and model.model.layers[0].self_attn.q_proj.alpha == 8
    assert model.model.layers[1].self_attn.q_proj.alpha == 3


def test_non_linear_target_and_double_injection_are_errors():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp \(MLP\)"):
        ml.inject(tiny(), ml.LoRAConfig(targets=["mlp"]))
    with pytest.raises(ValueError, match=r"model.embed_tokens \(Embedding\)"):
        ml.inject(tiny(), ml.LoRAConfig(targets=["embed_tokens"]))
    model = tiny()
    ml.inject(model, ml.LoRAConfig(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA") as e:
        ml.inject(model, ml.LoRAConfig(targets=["q_proj", "k_proj"]))
    assert "unwrap" not in str(e.value) and "minilora.load_adapter(model, dir)" in str(e.value)
    assert not isinstance(model.model.layers[0].self_attn.k_proj, ml.LoRALinear)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(targets=[]), "targets is empty"),
        (dict(targets=""), "targets is empty"),
        (dict(targets="q_proj(["), "not a valid regular expression"),
        (dict(exclude="(("), "not a valid regular expression"),
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-1), "r must be a positive integer"),
        (dict(alpha=0), "LoRAConfig.alpha must be a number > 0"),
        (dict(alpha=-4), "alpha must be a number > 0"),
        (dict(dropout=1.0), r"dropout must be a number in \[0, 1\)"),
        (dict(dropout=-0.5), r"dropout must be a number in \[0, 1\)"),
        (dict(bias="all"), "bias='all' is not supported"),
        (dict(layers=[-1]), "non-negative layer indices"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive integer"),
        (dict(alpha_pattern={"q_proj": 0}), r"alpha_pattern\['q_proj'\] must be a number > 0"),
        (dict(init="xavier"), "LoRAConfig.init must be one of"),
        (dict(use_rslora="yes"), "LoRAConfig.use_rslora must be a bool"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ml.LoRAConfig(**kwargs)


def test_count_parameters_counts_tied_once():
    model = tiny(vocab=50, d=16, n=3)
    trainable, total = ml.count_parameters(model)
    per_layer = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16  # attention, MLP, LayerNorm
    assert (trainable, total) == (total, 50 * 16 + 3 * per_layer)
    ml.inject(model, ml.LoRAConfig(r=2, targets=["q_proj", "down_proj"]))
    trainable, total2 = ml.count_parameters(model)
    assert trainable == 3 * (2 * 16 + 16 * 2) + 3 * (2 * 32 + 16 * 2)
    assert total2 == total + trainable


def test_model_merge_unmerge_disabled():
    model = tiny()
    base_out = model(IDS)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    lora_out = model(IDS)
    assert not torch.allclose(lora_out, base_out)
    ml.merge(model)
    ml.merge(model)
    torch.testing.assert_close(model(IDS), lora_out, rtol=1e-5, atol=1e-5)
    with ml.disabled(model):
        assert torch.equal(model(IDS), base_out)
    torch.testing.assert_close(model(IDS), lora_out, rtol=1e-5, atol=1e-5)  # merged again after the block
    ml.unmerge(model)
    for k, v in base_state.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert torch.equal(model(IDS), lora_out)


def test_disabled_restores_on_exception():
    model = tiny()
    ml.inject(model, ml.LoRAConfig(targets=["q_proj"]))
    randomize(model)
    out = model(IDS)
    with pytest.raises(RuntimeError, match="boom"), ml.disabled(model):
        raise RuntimeError("boom")
    assert torch.equal(model(IDS), out)
    assert not any(m.disabled for m in model.modules() if isinstance(m, ml.LoRALinear))


def test_merged_state_dict_has_base_keys_and_folded_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    base_keys = set(model.state_dict())
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize(model)
    out = model(IDS)
    sd = ml.merged_state_dict(model)
    # The tied head shares the embedding's tensor: kept once, under the embedding's name (as in
    # Hugging Face checkpoints), so safetensors can write it.
    assert set(sd) == base_keys - {"lm_head.weight"}
    q = model.model.layers[1].self_attn.q_proj
    assert torch.equal(sd["model.layers.1.self_attn.q_proj.weight"], q.weight + q.delta_weight())
    save_file(sd, tmp_path / "merged.safetensors")
    fresh = tiny(seed=5)
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "merged.safetensors"), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied: loaded through the embedding
    torch.testing.assert_close(fresh(IDS), out, rtol=1e-5, atol=1e-5)
    ml.merge(model)
    assert all(torch.equal(v, ml.merged_state_dict(model)[k]) for k, v in sd.items())


def test_tied_output_head_is_refused_naming_both_modules():
    for targets in (["lm_head", "q_proj"], "lm_head"):
        model = tiny()
        with pytest.raises(ValueError, match="lm_head shares its weight with model.embed_tokens"):
            ml.inject(model, ml.LoRAConfig(targets=targets))
        assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())
    untied = tiny()
    untied.lm_head.weight = nn.Parameter(untied.lm_head.weight.detach().clone())
    assert ml.inject(untied, ml.LoRAConfig(targets=["lm_head"])) == ["lm_head"]


class T5ish(nn.Module):
    """encoder.block.{i}.layer.{j}.wi, as T5 names its modules."""

    def __init__(self, d=8):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(nn.Module() for _ in range(2))
        for b in self.encoder.block:
            b.layer = nn.ModuleList(nn.Module() for _ in range(2))
            for sub in b.layer:
                sub.wi = nn.Linear(d, d)

    def forward(self, x):
        for b in self.encoder.block:
            for sub in b.layer:
                x = torch.tanh(sub.wi(x))
        return x


def test_layer_index_is_peft_s():
    # peft's rule without layers_pattern: the first whole-number segment after two or more others.
    assert ml.inject(T5ish(), ml.LoRAConfig(targets=["wi"], layers=[0])) == [
        "encoder.block.0.layer.0.wi",
        "encoder.block.0.layer.1.wi",
    ]
    names = ml.inject(tiny(), ml.LoRAConfig(targets=["q_proj"], layers=[1]))
    assert names == ["model.layers.1.self_attn.q_proj"]
    flat = tiny().model  # top-level `layers.{i}`: no layer index under peft's rule
    with pytest.raises(ValueError, match=r"remove all of them \(layers.0.self_attn.q_proj is in no layer"):
        ml.inject(flat, ml.LoRAConfig(targets=["q_proj"], layers=[0]))


def test_rank_pattern_matches_on_a_dot_boundary_only():
    model = tiny()
    ml.inject(model, ml.LoRAConfig(r=4, targets=["q_proj"], rank_pattern={"proj": 2}))
    assert all(m.r == 4 for m in model.modules() if isinstance(m, ml.LoRALinear))


def test_merge_error_names_the_module():
    model = tiny()
    ml.inject(model, ml.LoRAConfig(targets=["q_proj"]))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.lora_B.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj: .*NaN/Inf"):
        ml.merge(model)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj: .*NaN/Inf"):
        ml.merged_state_dict(model)
