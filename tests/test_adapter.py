"""Adapter files in peft's format, both directions, on tiny random Hugging Face Gemma 1/2/3 models.

transformers and peft are test-only oracles here: a model built by transformers from a tiny config
(no download), minilora injects into it by name, and peft must read what minilora writes (and the
reverse) with the same logits within 1e-5 in float32.
"""

import copy
import json
import logging
import os

import pytest
import torch

import minilora as ml

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=8,
    max_position_embeddings=64,
)


def hf_model(kind):
    torch.manual_seed(0)
    if kind == "gemma":
        cfg = transformers.GemmaConfig(num_key_value_heads=1, **COMMON)
        cls = transformers.GemmaForCausalLM
    elif kind == "gemma2":
        cfg = transformers.Gemma2Config(num_key_value_heads=2, sliding_window=4, **COMMON)
        cls = transformers.Gemma2ForCausalLM
    else:
        cfg = transformers.Gemma3TextConfig(num_key_value_heads=2, sliding_window=4, **COMMON)
        cls = transformers.Gemma3ForCausalLM
    model = cls(cfg).eval()
    with torch.no_grad():  # norms are zero-initialised offsets; make them matter
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(std=0.2)
    return model


IDS = torch.tensor([[2, 17, 33, 5, 81, 9, 12, 40], [2, 3, 3, 60, 7, 7, 1, 90]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_trainable(model, **kw):
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize(
    "cfg",
    [
        dict(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(r=2, alpha=5, targets="all-linear", use_rslora=True),
        dict(r=3, alpha=6, targets=["q_proj", "down_proj"], layers=[0, 2]),
        dict(r=4, alpha=8, targets=["v_proj", "up_proj"], exclude=["model.layers.1.mlp.up_proj"]),
        dict(
            r=4,
            alpha=8,
            targets=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ],
    ids=["qkvo", "all-linear-rslora", "layers", "exclude", "patterns"],
)
def test_minilora_adapter_loads_in_peft_with_same_logits(kind, cfg, tmp_path):
    base = hf_model(kind)
    ref = logits(base)
    model = copy.deepcopy(base)
    names = ml.inject(model, ml.LoRAConfig(**cfg))
    randomize(model)
    ours = logits(model)
    assert not torch.allclose(ours, ref, atol=1e-3)  # the adapter matters
    ml.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in (
        "peft_type",
        "task_type",
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "bias",
        "use_rslora",
        "use_dora",
        "fan_in_fan_out",
        "init_lora_weights",
        "modules_to_save",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "base_model_name_or_path",
    ):
        assert key in saved, key
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    wrapped = sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if hasattr(m, "lora_A") and isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert wrapped == sorted(names)  # peft's config selects exactly the modules in the file
    torch.testing.assert_close(logits(pm), ours, rtol=0, atol=1e-5)
    # Trainable counts equal peft's for the same settings.
    peft_kw = dict(
        r=saved["r"],
        lora_alpha=saved["lora_alpha"],
        target_modules=saved["target_modules"],
        layers_to_transform=saved["layers_to_transform"],
        rank_pattern=saved["rank_pattern"],
        alpha_pattern=saved["alpha_pattern"],
        use_rslora=saved["use_rslora"],
    )
    assert ml.count_parameters(model)[0] == peft_trainable(base, **peft_kw)


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize(
    "peft_kw",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=8,
            lora_alpha=4,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
            use_rslora=True,
        ),
        dict(
            r=4,
            lora_alpha=8,
            target_modules="all-linear",
            rank_pattern={"o_proj": 2, "down_proj": 6},
            alpha_pattern={"v_proj": 32, r"layers\.2\.mlp\.up_proj": 1},
        ),
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
    ],
    ids=["qv", "rslora", "patterns", "layers"],
)
def test_peft_adapter_loads_in_minilora_with_same_logits(kind, peft_kw, tmp_path):
    base = hf_model(kind)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **peft_kw)).eval()
    pm.save_pretrained(str(tmp_path))
    expected = logits(pm)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    model = copy.deepcopy(base)
    names = ml.load_adapter(model, tmp_path)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
    assert ml.count_parameters(model)[0] == 0  # loaded for inference: everything frozen
    # minilora writes it back; peft reads that and agrees again (round trip through both).
    ml.save_adapter(model, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "again")).eval()
    torch.testing.assert_close(logits(pm2), expected, rtol=0, atol=1e-5)
    assert len(names) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in pm.modules())


def test_config_with_targets_absent_from_model_loads_with_warning(tmp_path, caplog):
    base = hf_model("gemma")
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"]),
    )
    pm.save_pretrained(str(tmp_path))
    expected = logits(pm)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "fc_in", "fc_out", "out_proj"]  # as one seed adapter has
    cfg["some_future_field"] = {"unknown": True}  # fields we do not know are read without failing
    cfg_path.write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    with caplog.at_level(logging.WARNING, logger="minilora.adapter"):
        ml.load_adapter(model, tmp_path)
    assert "fc_in" in caplog.text and "out_proj" in caplog.text
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


def test_load_into_injected_model_then_train_and_merge(tmp_path):
    base = hf_model("gemma3")
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize(model)
    want = logits(model)
    ml.save_adapter(model, tmp_path)
    other = copy.deepcopy(base)
    ml.inject(other, ml.LoRAConfig(r=4, alpha=99, targets=["q_proj", "v_proj"]))
    ml.load_adapter(other, tmp_path, trainable=True)  # alpha comes from the file, not the injected config
    torch.testing.assert_close(logits(other), want, rtol=0, atol=1e-6)
    assert ml.count_parameters(other)[0] > 0
    ml.merge(other)
    torch.testing.assert_close(logits(other), want, rtol=1e-5, atol=1e-5)


def test_bad_adapter_inputs(tmp_path):
    base = hf_model("gemma")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ml.load_adapter(copy.deepcopy(base), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        ml.load_adapter(copy.deepcopy(base), tmp_path)
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    ml.save_adapter(model, tmp_path / "a")
    os.unlink(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        ml.load_adapter(copy.deepcopy(base), tmp_path / "a")

    ml.save_adapter(model, tmp_path / "b")  # truncated weights
    w = tmp_path / "b" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ml.load_adapter(copy.deepcopy(base), tmp_path / "b")
    w.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        ml.load_adapter(copy.deepcopy(base), tmp_path / "b")

    ml.save_adapter(model, tmp_path / "c")  # rank 4 adapter into a model injected with rank 2
    other = copy.deepcopy(base)
    ml.inject(other, ml.LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    with pytest.raises(
        ValueError, match=r"q_proj.lora_A.weight has shape \(4, 32\) but the model needs \(2, 32\)"
    ):
        ml.load_adapter(other, tmp_path / "c")

    wider = hf_model("gemma")  # a model whose layers are narrower than the adapter's
    wider_cfg = wider.config
    wider_cfg.hidden_size = 16
    narrow = transformers.GemmaForCausalLM(wider_cfg)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\) but the model needs \(4, 16\)"):
        ml.load_adapter(narrow, tmp_path / "c")

    shallow_cfg = copy.deepcopy(base.config)  # an adapter for a module that does not exist
    shallow_cfg.num_hidden_layers = 1
    shallow = transformers.GemmaForCausalLM(shallow_cfg)
    with pytest.raises(ValueError, match=r"does not have: model.layers.1.self_attn.q_proj"):
        ml.load_adapter(shallow, tmp_path / "c")

    (tmp_path / "c" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ml.load_adapter(copy.deepcopy(base), tmp_path / "c")

    with pytest.raises(ValueError, match="no LoRA layers to save"):
        ml.save_adapter(copy.deepcopy(base), tmp_path / "d")


def test_failed_save_leaves_existing_adapter_intact(tmp_path, monkeypatch):
    base = hf_model("gemma")
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, targets=["q_proj"]))
    randomize(model, seed=1)
    ml.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    randomize(model, seed=2)

    import minilora.adapter as adapter_mod

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ml.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left either

    monkeypatch.undo()
    monkeypatch.setattr(
        adapter_mod.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(TypeError("bad config"))
    )
    with pytest.raises(TypeError, match="bad config"):
        ml.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_peft_traps_are_covered(tmp_path):
    """peft drops tensors of modules its config does not select and ignores keys without the
    base_model.model. prefix: what minilora writes avoids both (every key prefixed; the config
    selects exactly the written modules, here a set only a regex can express)."""
    base = hf_model("gemma2")
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=2, targets=r"model\.layers\.(0\.self_attn\.q_proj|2\.mlp\.down_proj)"))
    randomize(model)
    ml.save_adapter(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys == [
        f"base_model.model.model.layers.{k}.{w}.weight"
        for k in ("0.self_attn.q_proj", "2.mlp.down_proj")
        for w in ("lora_A", "lora_B")
    ]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(pm), logits(model), rtol=0, atol=1e-5)
