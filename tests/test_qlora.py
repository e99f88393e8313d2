"""QLoRA end to end: Gemma 1, 2 and 3 with 4-bit base weights (checkpoint.from_pretrained(quantize=...)
and the 4-bit folders transformers + bitsandbytes save), peft adapters across the two, the 8-bit AdamW
through TrainConfig, and the command lines.

The oracle for a 4-bit model's logits is a float32 transformers model holding the weights that
bitsandbytes dequantizes from the saved tensors (DESIGN.md §8: bitsandbytes' own CPU forward differs
by ~1e-2 per layer, so it is not compared at 1e-4).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

import minilora as ml
from minilora.data import tokenize
from minilora.inject import lora_layers
from minilora.quant import Linear4bit
from minilora.train import MANIFEST, STATE, TrainConfig, _read_state, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from safetensors.torch import load_file, save_file  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["gemma1-mha", "gemma2", "gemma3"]
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _load(path: Path, name: str):  # a file by its path (pytest's importlib mode puts no folder on sys.path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bnb_4bit(path, **kw):
    """transformers' 4-bit model of the float folder `path`, as a QLoRA user loads it."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, **kw,
    )  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> (float32 folder, the 4-bit folder transformers + bitsandbytes saved from it)."""
    hf_tiny = _load(Path(__file__).with_name("_tiny.py"), "_tiny").hf_tiny
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        hf_tiny(kind).save_pretrained(root / "fp32")
        bnb_4bit(root / "fp32").save_pretrained(root / "nf4")  # before any forward (DESIGN.md §8)
        out[kind] = (root / "fp32", root / "nf4")
    return out


def dequantized_reference(fp32: Path, nf4: Path):
    """A float32 transformers model whose 4-bit layers hold bitsandbytes' dequantization of nf4's tensors."""
    tensors = load_file(nf4 / "model.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32).eval()
    modules = sorted({k.partition(".weight.")[0] for k in tensors if ".weight.quant_state." in k})
    for name in modules:
        part = {
            k.removeprefix(f"{name}.weight."): v
            for k, v in tensors.items()
            if k.startswith(f"{name}.weight.")
        }
        state = bnb.functional.QuantState.from_dict(part, device="cpu")
        w = bnb.functional.dequantize_4bit(tensors[f"{name}.weight"], state)
        model.get_submodule(name).weight.data.copy_(w)
    assert len(modules) == 7 * model.config.num_hidden_layers
    return model


IDS = torch.randint(4, 300, (2, 11), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids) if isinstance(model, ml.gemma.Gemma) else model(input_ids=ids).logits
    return out.float()


# ----------------------------------------------------------------------------------------------------
# Loading: bitsandbytes' 4-bit folders as they are, float folders quantized while read
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_bitsandbytes_4bit_folder_loads_and_equals_the_dequantized_float_model(folders, kind):
    fp32, nf4 = folders[kind]
    ours = ml.gemma.from_pretrained(nf4)
    linears = [m for m in ours.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear4bit) for m in linears)
    assert ours.model.embed_tokens.weight.dtype == torch.float32  # embedding (and tied head) stay
    torch.testing.assert_close(logits(ours), logits(dequantized_reference(fp32, nf4)), rtol=1e-4, atol=1e-4)
    # quantizing the float folder while reading gives bitsandbytes' tensors, bit for bit
    again = ml.gemma.from_pretrained(fp32, quantize="nf4").state_dict()
    theirs = ours.state_dict()
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in again)


def test_quantize_in_bfloat16_keeps_embeddings_and_norms_in_bfloat16(folders):
    fp32, _ = folders["gemma3"]
    model = ml.gemma.from_pretrained(fp32, dtype=torch.bfloat16, quantize="fp4")
    q = model.model.layers[0].self_attn.q_proj
    assert (
        isinstance(q, Linear4bit)
        and q.quant_state.quant_type == "fp4"
        and q.quant_state.dtype == torch.bfloat16
    )
    assert {p.dtype for n, p in model.named_parameters() if "proj" not in n} == {torch.bfloat16}
    assert logits(model).isfinite().all()


# ----------------------------------------------------------------------------------------------------
# peft adapters, both ways, over the two 4-bit models
# ----------------------------------------------------------------------------------------------------
def _train_a_little(params, loss_fn, optimizer=torch.optim.AdamW, steps=2):
    opt = optimizer(params, lr=2e-2)
    for _ in range(steps):
        loss_fn().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_trained_on_the_transformers_4bit_model_loads_into_minilora(folders, kind, tmp_path):
    fp32, nf4 = folders[kind]
    theirs = peft.get_peft_model(bnb_4bit(fp32), peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_SEVEN))
    params = [p for p in theirs.parameters() if p.requires_grad]
    _train_a_little(params, lambda: theirs(input_ids=IDS, labels=IDS).loss, steps=1)
    theirs.save_pretrained(tmp_path)
    ours = ml.gemma.from_pretrained(nf4)
    ml.load_adapter(ours, tmp_path)
    reference = peft.PeftModel.from_pretrained(dequantized_reference(fp32, nf4), tmp_path)
    expected = logits(reference)
    with reference.disable_adapter():
        assert not torch.allclose(expected, logits(reference), atol=1e-3)  # the adapter was trained
    torch.testing.assert_close(logits(ours), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_minilora_adapter_on_the_4bit_model_loads_into_peft(folders, kind, tmp_path):
    from minilora.optim import AdamW8bit

    fp32, nf4 = folders[kind]
    ours = ml.gemma.from_pretrained(nf4)
    ml.inject(ours, ml.LoRAConfig(r=4, alpha=8, targets="all-linear"))
    params = [p for p in ours.parameters() if p.requires_grad]
    _train_a_little(params, lambda: ours(IDS, labels=IDS), optimizer=AdamW8bit)
    ml.save_adapter(ours, tmp_path)
    reference = peft.PeftModel.from_pretrained(dequantized_reference(fp32, nf4), tmp_path)
    torch.testing.assert_close(logits(reference), logits(ours), rtol=1e-4, atol=1e-4)
    # peft also puts it on transformers' own 4-bit model (bitsandbytes' CPU forward: ~1e-2 off)
    on_4bit = peft.PeftModel.from_pretrained(bnb_4bit(fp32), tmp_path)
    assert (logits(on_4bit) - logits(ours)).abs().max() < 0.2


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------
def _copy(folder: Path, to: Path, config=None, tensors=None) -> Path:
    shutil.copytree(folder, to)
    if config is not None:
        hf = json.loads((to / "config.json").read_text())
        (to / "config.json").write_text(json.dumps(config(hf)))
    if tensors is not None:
        save_file(tensors(load_file(to / "model.safetensors")), to / "model.safetensors")
    return to


def test_errors_name_the_problem_and_the_fix(folders, tmp_path):
    fp32, nf4 = folders["gemma3"]
    with pytest.raises(ValueError, match="quantize='int4' is not supported; use one of nf4, fp4 or None"):
        ml.gemma.from_pretrained(fp32, quantize="int4")
    with pytest.raises(
        ValueError, match="float32, bfloat16 or float16.*got torch.float64 on cpu. Pass dtype="
    ):
        ml.gemma.from_pretrained(fp32, quantize="nf4", dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16.*got torch.float64"):
        ml.gemma.from_pretrained(nf4, dtype=torch.float64)  # a 4-bit folder computes in those too
    with pytest.raises(ValueError, match="has nf4 weights, but quantize='fp4' asks for others"):
        ml.gemma.from_pretrained(nf4, quantize="fp4")
    qc = lambda **kw: lambda hf: {**hf, "quantization_config": {**hf["quantization_config"], **kw}}
    for change, message in [
        (qc(quant_method="gptq"), "quant_method 'gptq'"),
        (qc(load_in_8bit=True, load_in_4bit=False), r"8-bit weights \(load_in_8bit, LLM.int8\)"),
        (qc(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type 'int4'"),
    ]:
        bad = _copy(nf4, tmp_path / message[:12].replace(" ", "_"), config=change)
        with pytest.raises(ValueError, match=f"quantization_config has {message}; minilora reads the 4-bit"):
            ml.gemma.from_pretrained(bad)


def test_bad_4bit_tensors_are_named(folders, tmp_path):
    _, nf4 = folders["gemma3"]
    q = "model.layers.1.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"

    def short(t):  # the packed bytes of another weight's size
        return {**t, q: t[q][:-8].clone()}

    def swapped(t):  # q_proj's 4-bit weight (64, 64) where k_proj's (32, 64) belongs
        return {**t, **{k + key[len(q) :]: v.clone() for key, v in t.items() if key.startswith(q)}}

    def option(t):  # a quantization option minilora lacks
        meta = json.loads(bytes(t[q + ".quant_state.bitsandbytes__nf4"].tolist()))
        text = json.dumps({**meta, "blocksize": 48}).encode()
        return {**t, q + ".quant_state.bitsandbytes__nf4": torch.tensor(list(text), dtype=torch.uint8)}

    for change, message in [
        (short, f"{q}: packed 4-bit weight has 2040 bytes but a \\(64, 64\\) weight takes 2048"),
        (swapped, f"{k}: the checkpoint's 4-bit weight is \\(64, 64\\) but this layer is \\(32, 64\\)"),
        (option, f"{q}: this 4-bit checkpoint has blocksize 48"),
    ]:
        bad = _copy(nf4, tmp_path / change.__name__, tensors=change)
        with pytest.raises(ValueError, match=message):
            ml.gemma.from_pretrained(bad)
    missing = _copy(
        nf4, tmp_path / "missing", tensors=lambda t: {n: v for n, v in t.items() if ".absmax" not in n}
    )
    with pytest.raises(ValueError, match=r"\.weight\.absmax: expected torch.uint8 with"):
        ml.gemma.from_pretrained(missing)


# ----------------------------------------------------------------------------------------------------
# 8-bit AdamW through TrainConfig, on a 4-bit base
# ----------------------------------------------------------------------------------------------------
class CharTokenizer:
    pad_id, eos_id, bos_id = 0, 1, 2
    stop_ids = (1,)

    def encode(self, text, add_bos=True):
        return ([self.bos_id] if add_bos else []) + [4 + b for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 4 for i in ids if 4 <= i < 260).decode(errors="replace")


TOK = CharTokenizer()
DATA = tokenize(
    [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(0, 60, 7) for b in (3, 11)], TOK
)


def qlora_model(folders, seed=0):
    model = ml.gemma.from_pretrained(folders["gemma3"][1])
    torch.manual_seed(seed)
    # r=64 over in=64: lora_A holds 4096 values, the least that AdamW8bit keeps in 8 bits
    ml.inject(model, ml.LoRAConfig(r=64, alpha=64, targets=["q_proj", "v_proj"]))
    return model


class Interrupt(Exception):
    pass


def _metrics(out: Path):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_adamw8bit_through_train_config_trains_and_resumes_exactly(folders, tmp_path, dtype, caplog):
    kw = dict(steps=4, batch_size=6, lr=5e-3, warmup_steps=1, save_every=2, dtype=dtype)
    with caplog.at_level(logging.INFO, logger="minilora.train"):
        config = TrainConfig(out_dir=str(tmp_path / "full"), optim="paged_adamw_8bit", **kw)
    assert config.optim == "adamw8bit" and "runs as 'adamw8bit'" in caplog.text
    train(qlora_model(folders), TOK, DATA, None, config)
    full = [{k: v for k, v in m.items() if k in ("step", "loss", "lr")} for m in _metrics(tmp_path / "full")]
    assert full[-1]["loss"] < full[0]["loss"] and all(math.isfinite(m["loss"]) for m in full)
    state = _read_state(tmp_path / "full" / "checkpoint" / STATE)
    assert {s["exp_avg"].dtype for s in state["optimizer"]["state"].values()} == {torch.uint8, torch.float32}

    def stop_at_3(info):
        if info["step"] == 3:
            raise Interrupt

    cut = dict(out_dir=str(tmp_path / "cut"), optim="adamw8bit", **kw)
    with pytest.raises(Interrupt):  # the first part with gradient checkpointing, the rest without
        train(qlora_model(folders), TOK, DATA, None, TrainConfig(**cut, grad_checkpointing=True), stop_at_3)
    with pytest.raises(ValueError, match="optim: checkpoint 'adamw8bit', this run 'adamw'"):
        train(qlora_model(folders), TOK, DATA, None, TrainConfig(**{**cut, "optim": "adamw"}, resume=True))
    train(qlora_model(folders, seed=1), TOK, DATA, None, TrainConfig(**cut, resume=True))
    resumed = [
        {k: v for k, v in m.items() if k in ("step", "loss", "lr")} for m in _metrics(tmp_path / "cut")
    ]
    assert resumed == full
    a, b = (tmp_path / d / "adapter" / "adapter_model.safetensors" for d in ("full", "cut"))
    assert a.read_bytes() == b.read_bytes()


def test_train_config_optim_is_checked():
    with pytest.raises(
        ValueError, match=r"optim must be one of \['adamw', 'adamw8bit', 'paged_adamw_8bit'\]"
    ):
        TrainConfig(optim="sgd")


# ----------------------------------------------------------------------------------------------------
# The command lines
# ----------------------------------------------------------------------------------------------------
def test_train_gemma_quantize_and_optim(folders, tmp_path, monkeypatch, capsys):
    example = _load(ROOT / "examples" / "train_gemma.py", "train_gemma")
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    assert "paging would" in " ".join(capsys.readouterr().out.split())
    fp32, _ = folders["gemma3"]
    monkeypatch.setattr(example, "Tokenizer", lambda path: TOK)
    out = tmp_path / "run"
    args = ["--model", str(fp32), "--quantize", "nf4", "--optim", "paged_adamw_8bit", "--grad-checkpointing"]
    args += ["--steps", "2", "--batch-size", "4", "--eval-examples", "2", "--max-new-tokens", "3"]
    records = [json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(records[:8]))
    (tmp_path / "eval.jsonl").write_text("".join(records[8:]))
    args += [
        "--data",
        str(tmp_path / "train.jsonl"),
        "--eval-data",
        str(tmp_path / "eval.jsonl"),
        "--out",
        str(out),
    ]
    example.main(args)
    printed = capsys.readouterr().out
    assert "float32, 4-bit nf4" in printed and "held-out exact match before" in printed
    manifest = json.loads((out / "checkpoint" / MANIFEST).read_text())
    assert manifest["settings"]["optim"] == "adamw8bit"
    model = ml.gemma.from_pretrained(fp32, quantize="nf4")
    ml.load_adapter(model, out / "adapter")
    assert any(m.lora_B.abs().sum() > 0 for _, m in lora_layers(model))


def test_generate_quantize(folders, monkeypatch, capsys):
    from minilora.generate import main

    fp32, _ = folders["gemma2"]
    monkeypatch.setattr(ml.tokenizer, "Tokenizer", lambda path: TOK)
    main(["--model", str(fp32), "--quantize", "nf4", "--max-new-tokens", "6", "1+2="])
    model = ml.gemma.from_pretrained(fp32, quantize="nf4")
    assert capsys.readouterr().out == ml.generate(model, TOK, "1+2=", max_new_tokens=6) + "\n"
