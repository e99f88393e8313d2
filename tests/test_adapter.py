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
    # ... and with the user's own settings given to peft, the same modules and the same count.
    user_kw = dict(
        r=cfg["r"],
        lora_alpha=cfg["alpha"],
        target_modules=cfg["targets"],
        layers_to_transform=cfg.get("layers"),
        exclude_modules=cfg.get("exclude"),
        rank_pattern=cfg.get("rank_pattern", {}),
        alpha_pattern=cfg.get("alpha_pattern", {}),
        use_rslora=cfg.get("use_rslora", False),
    )
    pm_user = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**user_kw))
    assert sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm_user.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    ) == sorted(names)
    assert ml.count_parameters(model)[0] == sum(p.numel() for p in pm_user.parameters() if p.requires_grad)


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

    import safetensors.torch

    import minilora.adapter as adapter_mod

    def broken_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
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


class T5ish(torch.nn.Module):
    """A plain nn.Module, encoder.block.{i}.layer.{j}.wi as T5 names its modules."""

    def __init__(self, d=8):
        super().__init__()
        self.encoder = torch.nn.Module()
        self.encoder.block = torch.nn.ModuleList(torch.nn.Module() for _ in range(3))
        for b in self.encoder.block:
            b.layer = torch.nn.ModuleList(torch.nn.Module() for _ in range(2))
            for sub in b.layer:
                sub.wi = torch.nn.Linear(d, d)

    def forward(self, x):
        for b in self.encoder.block:
            for sub in b.layer:
                x = torch.tanh(sub.wi(x))
        return x

    def prepare_inputs_for_generation(self, *args, **kwargs):  # peft's CAUSAL_LM wrapper asks for it
        raise NotImplementedError


class Flat(T5ish):
    """A plain nn.Module whose blocks are a top-level list: layers.{i}.layer.{j}.wi (no peft layer index
    for `layers.{i}`)."""

    def __init__(self, d=8):
        super().__init__(d)
        self.layers = self.encoder.block
        del self.encoder

    def forward(self, x):
        for b in self.layers:
            for sub in b.layer:
                x = torch.tanh(sub.wi(x))
        return x


@pytest.mark.parametrize(
    "cls, cfg",
    [
        (T5ish, dict(targets=["wi"], layers=[0, 2])),
        (T5ish, dict(targets=["wi"], layers=[1], exclude=["encoder.block.1.layer.1.wi"])),
        (Flat, dict(targets=["layers.0.layer.1.wi", "layers.2.layer.1.wi"])),
        (Flat, dict(targets=["wi"], layers=[1])),  # peft's index of layers.{i}.layer.{j} is j
    ],
    ids=["t5-layers", "t5-layers-exclude", "flat-names", "flat-layers"],
)
def test_adapter_of_a_plain_module_selects_the_same_modules_in_peft(cls, cfg, tmp_path):
    torch.manual_seed(0)
    base = cls()
    model = copy.deepcopy(base)
    names = ml.inject(model, ml.LoRAConfig(r=2, alpha=4, **cfg))
    randomize(model)
    ml.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    inner = pm.get_base_model()
    wrapped = [n for n, m in inner.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert wrapped == names
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(inner(x), model(x), rtol=0, atol=1e-6)


def test_merged_state_dict_of_hf_gemma_saves_with_safetensors_and_reloads(tmp_path):
    from safetensors.torch import save_file

    base = hf_model("gemma3")
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize(model)
    want = logits(model)
    sd = ml.merged_state_dict(model)
    assert "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    base.config.save_pretrained(tmp_path)
    merged = type(base).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(merged), want, rtol=1e-5, atol=1e-5)


def peft_adapter(tmp_path, kind="gemma", **kw):
    """A random peft adapter (r=4 on q_proj/v_proj unless kw says otherwise) saved in tmp_path."""
    base = hf_model(kind)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) | kw
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kw))
    pm.save_pretrained(str(tmp_path))
    return base, pm.eval()


def edit_config(adapter_dir, **changes):
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def test_missing_lora_alpha_defaults_to_peft_s_8(tmp_path):
    base, _ = peft_adapter(tmp_path, lora_alpha=2)
    edit_config(tmp_path, lora_alpha=None)
    expected = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval())
    model = copy.deepcopy(base)
    ml.load_adapter(model, tmp_path)
    assert model.model.layers[0].self_attn.q_proj.alpha == 8
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(alpha_pattern={"v_proj": 0}), r"alpha_pattern\['v_proj'\] \(the alpha of model.layers.0"),
        (dict(lora_alpha=-1), r"lora_alpha \(the alpha of model.layers.0.self_attn.q_proj\) must be"),
        (dict(lora_alpha="8"), r"lora_alpha .* must be a number > 0, got '8'"),
        (dict(lora_dropout=1.0), r"lora_dropout must be a number in \[0, 1\), got 1.0"),
        (dict(use_rslora="yes"), "use_rslora must be a bool"),
    ],
)
def test_bad_config_values_fail_before_the_model_is_touched(tmp_path, changes, message):
    base, _ = peft_adapter(tmp_path)
    edit_config(tmp_path, **changes)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message) as e:
        ml.load_adapter(model, tmp_path)
    assert str(tmp_path / "adapter_config.json") in str(e.value)
    assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_non_finite_adapter_weights_are_refused_before_the_model_is_touched(tmp_path):
    from safetensors.torch import load_file, save_file

    base, _ = peft_adapter(tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    tensors = load_file(w)
    key = "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, w)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=f"{w}: {key} has NaN/Inf"):
        ml.load_adapter(model, tmp_path)
    assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())


def test_adapter_on_a_tied_head_is_refused(tmp_path):
    base = hf_model("gemma")
    untied = copy.deepcopy(base)  # an adapter file with LoRA on lm_head, written from an untied copy
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    ml.inject(untied, ml.LoRAConfig(r=2, targets=["q_proj", "lm_head"]))
    ml.save_adapter(untied, tmp_path)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="lm_head shares its weight with model.embed_tokens"):
        ml.load_adapter(model, tmp_path)
    assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())


def test_load_into_a_model_with_lora_the_file_does_not_cover_is_an_error(tmp_path):
    base, pm = peft_adapter(tmp_path, target_modules=["q_proj"])
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, targets=["q_proj", "v_proj"]))
    randomize(model)
    before = logits(model)
    with pytest.raises(ValueError, match=r"already has LoRA on model.layers.0.self_attn.v_proj.*mix two"):
        ml.load_adapter(model, tmp_path)
    assert torch.equal(logits(model), before)  # untouched
    exact = copy.deepcopy(base)  # LoRA on exactly the file's modules: the file's adapter, nothing else
    ml.inject(exact, ml.LoRAConfig(r=4, alpha=1, targets=["q_proj"]))
    randomize(exact)
    ml.load_adapter(exact, tmp_path)
    torch.testing.assert_close(logits(exact), logits(pm), rtol=0, atol=1e-5)


def test_load_into_a_merged_model_replaces_the_merged_adapter(tmp_path):
    base, pm = peft_adapter(tmp_path, lora_alpha=16)
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize(model)
    ml.merge(model)
    ml.load_adapter(model, tmp_path)
    layers = [m for m in model.modules() if isinstance(m, ml.LoRALinear)]
    assert layers and all(m.merged and m.alpha == 16 for m in layers)
    torch.testing.assert_close(logits(model), logits(pm), rtol=1e-5, atol=1e-5)
    ml.unmerge(model)
    for name, m in model.named_modules():
        if isinstance(m, ml.LoRALinear):
            assert torch.equal(m.weight, base.get_submodule(name).weight), name  # W0's exact bits


def test_adapter_files_get_the_usual_mode(tmp_path):
    model = copy.deepcopy(hf_model("gemma"))
    ml.inject(model, ml.LoRAConfig(r=2, targets=["q_proj"]))
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            ml.save_adapter(model, tmp_path / oct(umask))
        finally:
            os.umask(old)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert (tmp_path / oct(umask) / name).stat().st_mode & 0o777 == mode, (name, oct(umask))


def lora_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_a_crash_anywhere_in_save_adapter_leaves_the_old_or_the_new_adapter(tmp_path, monkeypatch):
    """Issue 9 (5): the new files go into a sibling folder that is swapped in with renames; a crash at
    any rename leaves a folder that loads as the old adapter or the new one (never neither, never a
    mix), and the next save cleans up what the crash left."""
    base = hf_model("gemma")
    model = copy.deepcopy(base)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj"]))
    randomize(model)
    folder = tmp_path / "adapter"
    ml.save_adapter(model, folder)
    (folder / "README.md").write_text("notes of the user")  # another file in the folder is kept
    old = lora_weights(model)
    for m in model.modules():
        if isinstance(m, ml.LoRALinear):
            m.set_scaling(64)  # the new save differs in the config as well as the weights
    randomize(model, seed=2)
    new = lora_weights(model)

    def loads_as(expected, scaling):
        loaded = copy.deepcopy(base)
        ml.load_adapter(loaded, folder)
        got = lora_weights(loaded)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert loaded.model.layers[0].self_attn.q_proj.scaling == scaling

    real_replace = os.replace
    for crash_at in range(4):  # 2 renames of files into the new folder, then the 2 of the swap
        calls = []

        def replace_then_die(src, dst, crash_at=crash_at, calls=calls):
            if len(calls) == crash_at:
                raise KeyboardInterrupt("killed")
            calls.append(dst)
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_then_die)
        with pytest.raises(KeyboardInterrupt):
            ml.save_adapter(model, folder)
        monkeypatch.undo()
        loads_as(old, 8 / 4)  # at crash 3 from .adapter.old, where the swap had moved it
    (tmp_path / ".adapter.0123456789ab.tmp").mkdir()  # what a SIGKILL inside a save leaves
    ml.save_adapter(model, folder)  # the next save: the new adapter, nothing stale left
    loads_as(new, 64 / 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                       "adapter_model.safetensors"]  # fmt: skip
    assert (folder / "README.md").read_text() == "notes of the user"
    monkeypatch.chdir(folder)  # the folder is swapped in whole: never the one the process is in
    with pytest.raises(ValueError, match="cannot be the current directory"):
        ml.save_adapter(model, ".")


@pytest.mark.parametrize(
    "edit, message",
    [  # issue 9 (6): refused, where they used to load (or "load" 0 modules and freeze the model)
        (lambda t, k: t.update({k: t[k].to(torch.int8)}), r"lora_B.weight is torch.int8; LoRA weights are"),
        (lambda t, k: t.update({k: t[k] != 0}), r"lora_B.weight is torch.bool; LoRA weights are floating"),
        (lambda t, k: t.update({k: t[k].to(torch.complex64)}), r"is torch.complex64; LoRA weights are float"),
        (lambda t, k: t.update({k.replace("base_model.model.", ""): t[k].clone()}), r"are the same weight"),
        (lambda t, k: t.clear(), r"adapter_model.safetensors holds no tensors"),
    ],
    ids=["int8", "bool", "complex", "duplicate-key", "no-tensors"],
)
def test_adapter_tensors_are_float_unique_and_present(tmp_path, edit, message):
    from safetensors.torch import load_file, save_file

    base, _ = peft_adapter(tmp_path)
    w = tmp_path / "adapter_model.safetensors"
    tensors = load_file(w)
    edit(tensors, "base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight")
    save_file(tensors, w)
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=message):
        ml.load_adapter(model, tmp_path)
    assert not any(isinstance(m, ml.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "text, message",
    [  # issue 9 (7): used to be AttributeError: 'list' object has no attribute 'get'
        ("[1, 2]", "holds a JSON list, not an object"),
        ("null", "holds a JSON NoneType, not an object"),
        ('"LORA"', "holds a JSON str, not an object"),
        ("", r"is not valid JSON \(the file is empty\)"),
        ('{"r": 4, "r": 8}', r"is not valid JSON \(key 'r' appears twice in one object\)"),
        ("[" * 100_000 + "]" * 100_000, r"is not valid JSON \(nested too deeply\)"),
    ],
    ids=["list", "null", "string", "empty", "duplicate-key", "deep"],
)
def test_adapter_config_must_be_one_json_object(tmp_path, text, message):
    base, _ = peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"adapter_config.json {message}"):
        ml.load_adapter(copy.deepcopy(base), tmp_path)


def test_peft_field_names_are_refused_with_minilora_s_names():
    # issue 9 (9): used to be a bare TypeError (unexpected keyword argument 'lora_alpha')
    with pytest.raises(TypeError, match=r"takes alpha=, not peft's lora_alpha=; targets=, not peft's target"):
        ml.LoRAConfig(r=8, lora_alpha=16, target_modules=["q_proj"])
    with pytest.raises(TypeError, match=r"dropout=, not peft's lora_dropout="):
        ml.LoRAConfig(lora_dropout=0.1)


def test_the_prompt_format_is_a_file_of_its_own_that_peft_ignores(tmp_path):
    model = copy.deepcopy(hf_model("gemma"))
    ml.inject(model, ml.LoRAConfig(r=2, targets=["q_proj"]))
    randomize(model)
    prompt = {"format": "template", "template": "### q: {input}\n### a: {target}"}
    ml.save_adapter(model, tmp_path, prompt=prompt)
    assert ml.adapter.read_prompt(tmp_path) == prompt
    expected = logits(model)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model("gemma")), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    ml.save_adapter(model, tmp_path)  # saved without one: the old file goes with the old adapter
    assert ml.adapter.read_prompt(tmp_path) is None
