"""Tokenizer: special tokens, <bos> handling, decoding, Gemma's chat template, errors.

The SentencePiece models here are trained in the test with Gemma's settings (ids pad 0, eos 1,
bos 2, unk 3; BPE; byte fallback; no normalization, no dummy prefix). The real Gemma tokenizer is
checked against transformers in test_gguf.py (slow).
"""

import io

import pytest
import sentencepiece as spm

import minilora
from minilora.tokenizer import Tokenizer

CORPUS = [
    "The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n",
    "Hello world! Hello there, world.",
    "안녕하세요 세계",
    "numbers 12345 and 2026-11-23",
] * 20


def _train(path, **special):
    """Train a tiny Gemma-like SentencePiece model at `path`; `special` adds control/user symbols."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        allow_whitespace_only_pieces=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        **special,
    )
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A folder with tokenizer.model where the turn markers are *control* pieces, as in Gemma."""
    d = tmp_path_factory.mktemp("tok")
    _train(
        d / "tokenizer.model",
        control_symbols=["<start_of_turn>", "<end_of_turn>", "<mask>"],
        user_defined_symbols=["<start_of_image>", "\n"],
    )
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def sp(model_dir):
    return spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))


def test_ids_and_stop_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert tok.end_of_turn_id == tok.piece_to_id("<end_of_turn>")
    assert tok.stop_ids == frozenset({1, tok.end_of_turn_id})
    assert tok.vocab_size == len(tok) >= 400
    assert minilora.Tokenizer is Tokenizer


def test_folder_or_file(model_dir, tok):
    other = Tokenizer(model_dir / "tokenizer.model")
    assert other.encode("Hello world") == tok.encode("Hello world")


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "  two leading spaces, three   inside, trailing  ",
        "def f(x):\n\treturn x\n\n",
        "한국어 문장과 emoji 🤗, unseen characters ЖΩ",
        "ＡＢＣ fullwidth stays fullwidth",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.encode(text) == [tok.bos_id] + ids


def test_control_pieces_in_text_become_single_ids(tok, sp):
    sot, eot = tok.piece_to_id("<start_of_turn>"), tok.piece_to_id("<end_of_turn>")
    assert sp.is_control(sot) and sp.is_control(eot)
    # SentencePiece alone spells a control piece out of ordinary pieces; that is what we fix.
    assert sot not in sp.encode("<start_of_turn>")
    text = "<start_of_turn>user\nHello world<end_of_turn>\n"
    want = [tok.bos_id, sot] + sp.encode("user\nHello world") + [eot] + sp.encode("\n")
    assert tok.encode(text) == want
    for piece in ["<eos>", "<pad>", "<unk>", "<mask>", "<bos>"]:
        assert tok.encode(f"a{piece}b", add_bos=False) == sp.encode("a") + [
            tok.piece_to_id(piece)
        ] + sp.encode("b")


def test_user_defined_pieces_in_text(tok, sp):
    soi = tok.piece_to_id("<start_of_image>")
    assert not sp.is_control(soi)
    assert tok.encode("x<start_of_image>y", add_bos=False) == sp.encode("x") + [soi] + sp.encode("y")


def test_bos_never_doubled(tok):
    hi = tok.encode("Hello", add_bos=False)
    assert tok.bos_id not in hi
    assert tok.encode("Hello") == [tok.bos_id] + hi
    # A text that starts with "<bos>" carries its own: the same ids with or without add_bos.
    assert tok.encode("<bos>Hello") == tok.encode("<bos>Hello", add_bos=False) == [tok.bos_id] + hi
    assert tok.encode("") == [tok.bos_id]
    assert tok.encode("", add_bos=False) == []
    # A <bos> written elsewhere is kept where it is written.
    assert tok.encode("Hello<bos>") == [tok.bos_id] + hi + [tok.bos_id]


def test_decode_special(tok):
    text = "<start_of_turn>model\nHello world<end_of_turn>\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == "<bos>" + text
    assert tok.decode(ids, skip_special=True) == "model\nHello world\n"
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_chat_template(tok):
    msgs = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert tok.apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.apply_chat_template(msgs[:2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    )
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(system) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    # "model" is accepted as the assistant's role; content may be a list of text parts.
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        {"role": "model", "content": "Yo"},
    ]
    assert tok.apply_chat_template(parts, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n"
    )


def test_chat_template_list_content_as_the_official_template(tok):
    # Gemma 3's official template (tokenizer_config.json of google/gemma-3-*-it): a turn's text parts
    # are trimmed one by one and joined (`item['text'] | trim`); a system message goes in as it is,
    # and of a list only its first part (`messages[0]['content'][0]['text'] + '\n\n'`).
    parts = lambda *texts: [{"type": "text", "text": t} for t in texts]  # noqa: E731
    msgs = [
        {"role": "system", "content": parts("A ", " B")},
        {"role": "user", "content": parts(" x ", " y ")},
        {"role": "assistant", "content": parts(" a\n", "\tb ")},
        {"role": "user", "content": []},
    ]
    assert tok.apply_chat_template(msgs) == (
        "<bos><start_of_turn>user\nA \n\nxy<end_of_turn>\n<start_of_turn>model\nab<end_of_turn>\n"
        "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\n"
    )
    system = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": parts(" Hi ")}]
    assert tok.apply_chat_template(system, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n"
    )


def test_chat_template_encodes_with_one_bos(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hello"}])
    ids = tok.encode(text)
    assert ids == tok.encode(text, add_bos=False)
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
    assert ids[1] == tok.piece_to_id("<start_of_turn>")
    assert ids.count(tok.piece_to_id("<end_of_turn>")) == 1


@pytest.mark.parametrize(
    "msgs, match",
    [
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([{"role": "assistant", "content": "x"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only allowed first"),
        ([{"role": "system", "content": "s"}], "followed by a user message"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "user", "content": 3}], "str or a list of text parts"),
        ([{"role": "user", "content": [{"type": "image"}]}], "str or a list of text parts"),
        ([{"role": "system", "content": []}, {"role": "user", "content": "a"}], "list of text parts"),
    ],
)
def test_chat_template_errors(tok, msgs, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(msgs)


def test_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)
    with pytest.raises(KeyError, match="not a piece"):
        tok.piece_to_id("<no_such_piece>")
    with pytest.raises(IndexError):
        tok.id_to_piece(-1)
    with pytest.raises(TypeError, match="str"):
        tok.encode([1, 2])


def test_without_turn_markers(tmp_path):
    tok = Tokenizer(_train(tmp_path / "plain.model"))
    assert tok.end_of_turn_id is None
    assert tok.stop_ids == frozenset({tok.eos_id})
    with pytest.raises(ValueError, match="<start_of_turn>"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
