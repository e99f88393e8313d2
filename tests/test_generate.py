"""minilora.generate: the KV-cached loop equals full recomputation and transformers' greedy
generate; stop ids, sampling, chat messages and the command line."""

import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minilora as ml
from minilora import gemma
from minilora.generate import generate_ids, main, next_token

transformers = pytest.importorskip("transformers")

# tests/_tiny.py, loaded by its path: pytest's importlib mode puts no test folder on sys.path (and
# `from tests._tiny import ...` works only from pytest 8.3 on).
_spec = importlib.util.spec_from_file_location("_tiny", Path(__file__).with_name("_tiny.py"))
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)
hf_tiny = _tiny.hf_tiny

KINDS = ["gemma1-mqa", "gemma2", "gemma3"]  # tiny models of tests/_tiny.py: MQA, soft-capping, qk-norm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (transformers model, folder), tiny and random (norm weights too)."""
    out = {}
    for kind in KINDS:
        model = hf_tiny(kind, std=0.08)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (model, path)
    return out


class StubTokenizer:
    """minilora.Tokenizer's interface over bytes: ids 4..259 are bytes, specials are single ids."""

    SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<start_of_turn>": 260, "<end_of_turn>": 261}
    pad_id, eos_id, bos_id = 0, 1, 2

    def __init__(self, stop_ids=(1, 261)):
        self.stop_ids = set(stop_ids)

    def encode(self, text, add_bos=True):
        ids = []
        for piece in re.split("(" + "|".join(map(re.escape, self.SPECIAL)) + ")", text):
            if piece in self.SPECIAL:
                ids.append(self.SPECIAL[piece])
            else:
                ids.extend(b + 4 for b in piece.encode())
        # Tokenizer.encode's rule: with add_bos, exactly one <bos> first (a written one counts).
        return [self.bos_id] + ids if add_bos and ids[:1] != [self.bos_id] else ids

    def decode(self, ids):
        names = {v: k for k, v in self.SPECIAL.items()}
        return "".join(names.get(i) or (chr(i - 4) if 4 <= i < 260 else f"<{i}>") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        role = lambda m: "model" if m["role"] == "assistant" else m["role"]
        text = "<bos>" + "".join(f"<start_of_turn>{role(m)}\n{m['content']}<end_of_turn>\n" for m in messages)
        return text + ("<start_of_turn>model\n" if add_generation_prompt else "")


PROMPT = [2, 17, 99, 250, 3, 41, 7]  # 7 tokens; with 20 new ones, far past the window of 5


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_with_cache_equals_recompute_and_transformers(checkpoints, kind):
    hf, path = checkpoints[kind]
    model = gemma.from_pretrained(path)
    cached = generate_ids(model, PROMPT, max_new_tokens=20)
    recomputed = list(PROMPT)  # the reference the cache must equal: the whole sequence every step
    with torch.no_grad():
        for _ in range(20):
            recomputed.append(int(model(torch.tensor([recomputed]))[0, -1].argmax()))
    recomputed = recomputed[len(PROMPT) :]
    hf.generation_config.eos_token_id = None  # no stop ids on either side
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert len(cached) == 20
    assert cached == recomputed == out[0, len(PROMPT) :].tolist()


def first_new_index(seq):
    """The first k >= 1 whose token has not appeared before it (so stopping there is unambiguous)."""
    return next(k for k in range(1, len(seq)) if seq[k] not in seq[:k])


def test_stops_at_any_stop_id(checkpoints):
    model = gemma.from_pretrained(checkpoints["gemma3"][1])
    free = generate_ids(model, PROMPT, max_new_tokens=12)
    k = first_new_index(free)
    assert generate_ids(model, PROMPT, max_new_tokens=12, stop_ids={free[k], 299}) == free[:k]
    assert generate_ids(model, PROMPT, max_new_tokens=0) == []


def test_text_prompt_and_chat_messages(checkpoints):
    model = gemma.from_pretrained(checkpoints["gemma2"][1])
    tok = StubTokenizer(stop_ids=())
    text = ml.generate(model, tok, "Hi there", max_new_tokens=6)
    assert text == tok.decode(generate_ids(model, tok.encode("Hi there"), 6))
    messages = [{"role": "user", "content": "Hi"}]
    ids = tok.encode(tok.apply_chat_template(messages), add_bos=False)
    assert ids[:2] == [2, 260] and ids.count(2) == 1  # one <bos>, even though the template writes it
    assert ml.generate(model, tok, messages, max_new_tokens=6) == tok.decode(generate_ids(model, ids, 6))
    with pytest.raises(TypeError, match="prompt string or a list of"):
        ml.generate(model, tok, {"role": "user", "content": "a dict, not a list"})


def test_generate_stops_at_the_tokenizers_stop_ids(checkpoints):
    model = gemma.from_pretrained(checkpoints["gemma3"][1])
    prompt = StubTokenizer().encode("Hi there")
    free = generate_ids(model, prompt, max_new_tokens=12)
    k = first_new_index(free)
    # The k-th new token plays <end_of_turn> (the stub's <eos> 1 stays a stop id as well): generate()
    # reads tok.stop_ids, stops there and returns only the text before it.
    tok = StubTokenizer(stop_ids={1, free[k]})
    assert ml.generate(model, tok, "Hi there", max_new_tokens=12) == tok.decode(free[:k])
    assert ml.generate(model, StubTokenizer(stop_ids=()), "Hi there", max_new_tokens=12) == tok.decode(free)


def test_sampling_is_reproducible_with_a_seed(checkpoints):
    model = gemma.from_pretrained(checkpoints["gemma3"][1])
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = generate_ids(model, PROMPT, seed=7, **kw)
    assert a == generate_ids(model, PROMPT, seed=7, **kw)
    assert a != generate_ids(model, PROMPT, seed=8, **kw)
    greedy = generate_ids(model, PROMPT, max_new_tokens=16)
    assert generate_ids(model, PROMPT, seed=1, top_k=1, **kw) == greedy
    assert generate_ids(model, PROMPT, seed=1, top_p=1e-6, **kw) == greedy


def test_next_token_top_k_and_top_p_support():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {next_token(logits, 1.0, generator=g, **kw) for _ in range(300)}
    assert next_token(logits) == 1
    assert draws() == {0, 1, 2, 3}
    assert draws(top_k=2) == {1, 3}
    # top_p=0.7: 0.5 < 0.7 keeps the next token (0.3); 0.5 + 0.3 >= 0.7 drops the rest.
    assert draws(top_p=0.7) == {1, 3}
    assert draws(top_p=0.85) == {1, 3, 2}


@pytest.mark.parametrize(
    "kw, message",
    [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
     (dict(max_new_tokens=-1), "max_new_tokens")],
)  # fmt: skip
def test_bad_sampling_arguments(checkpoints, kw, message):
    model = gemma.from_pretrained(checkpoints["gemma1-mqa"][1], device="meta")
    with pytest.raises(ValueError, match=message):
        generate_ids(model, PROMPT, **kw)


def test_generation_runs_in_eval_mode_and_restores_training(checkpoints):
    model = gemma.from_pretrained(checkpoints["gemma3"][1])
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, dropout=0.5, targets=["q_proj", "v_proj"]))
    model.train()
    a = generate_ids(model, PROMPT, max_new_tokens=8)
    assert model.training
    model.eval()
    assert a == generate_ids(model, PROMPT, max_new_tokens=8)  # dropout was off


def test_a_packed_base_is_dequantized_once_per_generation(checkpoints, monkeypatch):
    """generate_ids keeps the dequantized weights of a 4-bit (or GGUF) base for the whole call: as
    many dequantizations for 12 new tokens as for 2, one per layer, and the same tokens as without."""
    model = gemma.from_pretrained(checkpoints["gemma3"][1], quantize="nf4")
    layers = sum(isinstance(m, ml.quant.Linear4bit) for m in model.modules())
    want = generate_ids(model, PROMPT, max_new_tokens=12)
    calls, dequantize = [], ml.quant.QuantState.dequantize
    monkeypatch.setattr(
        ml.quant.QuantState, "dequantize", lambda *a, **k: calls.append(1) or dequantize(*a, **k)
    )
    for n in (2, 12):
        calls.clear()
        assert generate_ids(model, PROMPT, max_new_tokens=n) == want[:n] and len(calls) == layers > 0


def test_command_line(checkpoints, tmp_path, monkeypatch, capsys):
    path = checkpoints["gemma2"][1]
    tok = StubTokenizer(stop_ids=())
    monkeypatch.setattr(ml.tokenizer, "Tokenizer", lambda _: tok)
    main(["--model", str(path), "--max-new-tokens", "5", "Hello"])
    model = gemma.from_pretrained(path)
    printed = capsys.readouterr()
    assert printed.out == ml.generate(model, tok, "Hello", max_new_tokens=5) + "\n"
    assert printed.err.startswith("dtype float32 (auto on the CPU: ")  # the choice, once, not on stdout

    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    ml.save_adapter(model, tmp_path / "adapter")
    main(["--model", str(path), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "5", "Hello"])
    with_adapter = ml.generate(model, tok, "Hello", max_new_tokens=5)
    assert capsys.readouterr().out == with_adapter + "\n"
    with ml.disabled(model):
        assert ml.generate(model, tok, "Hello", max_new_tokens=5) != with_adapter


def test_python_dash_m_runs_the_command_line_once(tmp_path):
    """`python -m minilora.generate` loads the module once (no runpy double-import warning)."""
    out = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "minilora.generate", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage: minilora-generate" in out.stdout
    assert "RuntimeWarning" not in out.stderr


def test_command_line_applies_the_adapters_prompt_format(checkpoints, tmp_path, monkeypatch, capsys):
    # issue 9 (9): the trained model answered only if the user typed the training template themselves
    from minilora.data import generation_prompt

    path = checkpoints["gemma2"][1]
    tok = StubTokenizer(stop_ids=())
    monkeypatch.setattr(ml.tokenizer, "Tokenizer", lambda _: tok)
    model = gemma.from_pretrained(path)
    ml.inject(model, ml.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.5)
    for fmt, template in (("alpaca", None), ("chat", None), ("template", "Q: {q}\nA: {a}")):
        ml.save_adapter(model, tmp_path / "adapter", prompt={"format": fmt, "template": template})
        main(["--model", str(path), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "4", "Hi"])
        formatted = generation_prompt("Hi", fmt, template, tok=tok)
        assert formatted != "Hi" and capsys.readouterr().out == ml.generate(model, tok, formatted, 4) + "\n"
        main(
            [
                "--model",
                str(path),
                "--adapter",
                str(tmp_path / "adapter"),
                "--max-new-tokens",
                "4",
                "--raw",
                "Hi",
            ]
        )
        assert capsys.readouterr().out == ml.generate(model, tok, "Hi", 4) + "\n"
