"""minilora.data: formats -> ids + labels (prompt masked), truncation/skip counts, batches, sampler, errors.

A character-level stand-in tokenizer keeps these tests exact and fast: every character is one id,
so the expected ids and labels can be written down from the strings. Special tokens written in text
map to single ids, as the Gemma tokenizer's do.
"""

import json
import re

import pytest
import torch

from minilora.data import (
    ALPACA_PROMPT,
    StepSampler,
    collate,
    load_dataset,
    n_targets,
    prompt_and_target,
    tokenize,
)
from minilora.gemma import IGNORE_INDEX
from minilora.tokenizer import Tokenizer


class CharTokenizer:
    pad_id, eos_id, bos_id, end_of_turn_id, start_of_turn_id = 0, 1, 2, 5, 4
    SPECIAL = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 4, "<end_of_turn>": 5}

    def encode(self, text, add_bos=True):
        ids = [self.bos_id] if add_bos else []
        for piece in re.split(r"(<pad>|<eos>|<bos>|<start_of_turn>|<end_of_turn>)", text):
            ids += [self.SPECIAL[piece]] if piece in self.SPECIAL else [10 + ord(c) for c in piece]
        return ids

    def decode(self, ids):
        inv = {v: k for k, v in self.SPECIAL.items()}
        return "".join(inv[i] if i in inv else chr(i - 10) for i in ids)

    # Gemma's chat template and its rules: the real tokenizer's, which needs only the turn ids above
    apply_chat_template = Tokenizer.apply_chat_template


TOK = CharTokenizer()


def learned_text(labels):
    return TOK.decode([x for x in labels if x != IGNORE_INDEX])


def one(record, **kw):
    data = tokenize([record], TOK, **kw)
    assert len(data) == 1
    return data[0]


def test_text_format_learns_every_token_and_eos():
    ids, labels = one({"text": "hello"})
    assert ids == [TOK.bos_id] + TOK.encode("hello", add_bos=False) + [TOK.eos_id]
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_prompt_completion_masks_the_prompt():
    ids, labels = one({"prompt": "Q: 2+2?\nA: ", "completion": "4"})
    prompt = [TOK.bos_id] + TOK.encode("Q: 2+2?\nA: ", add_bos=False)
    assert ids == prompt + TOK.encode("4", add_bos=False) + [TOK.eos_id]
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert learned_text(labels) == "4<eos>"


def test_mask_prompt_off_learns_the_prompt_too():
    ids, labels = one({"prompt": "ab", "completion": "c"}, mask_prompt=False)
    assert labels == [IGNORE_INDEX] + ids[1:]


def test_alpaca_with_and_without_input():
    ids, labels = one({"instruction": "Add.", "input": "2 2", "output": "4"})
    assert TOK.decode(ids[1:]) == ALPACA_PROMPT.format(instruction="Add.", input="2 2") + "4<eos>"
    assert learned_text(labels) == "4<eos>"
    ids, labels = one({"instruction": "Say hi.", "output": "hi"})
    text = TOK.decode(ids[1:])
    assert "### Input" not in text and text.endswith("### Response:\nhi<eos>")
    assert learned_text(labels) == "hi<eos>"


def test_chat_learns_model_turns_only_and_follows_gemma_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "model", "content": "Later"},
    ]
    ids, labels = one({"messages": messages})
    expected = (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\nLater<end_of_turn>\n"
    )
    assert ids[0] == TOK.bos_id and TOK.decode(ids[1:]) == expected  # one <bos>, no <eos> after the chat
    assert learned_text(labels) == "Hello<end_of_turn>Later<end_of_turn>"
    prompt, target = prompt_and_target({"messages": messages}, "chat", tok=TOK)
    assert prompt.endswith("<start_of_turn>model\n") and target == "Hello"


def test_template_last_placeholder_is_the_completion():
    template = "### context: {input}\n### question: {target}"
    ids, labels = one({"input": "sky", "target": "why blue?", "other": 1}, template=template)
    assert TOK.decode(ids[1:]) == "### context: sky\n### question: why blue?<eos>"
    assert learned_text(labels) == "why blue?<eos>"
    # Literal text after the last placeholder belongs to the completion; {{ }} are literal braces.
    ids, labels = one({"a": "x", "b": "y"}, template="{{json}} {a} -> {b}.")
    assert TOK.decode(ids[1:]) == "{json} x -> y.<eos>" and learned_text(labels) == "y.<eos>"
    assert prompt_and_target({"input": "s", "target": "t"}, "template", template) == (
        "### context: s\n### question: ",
        "t",
    )


def test_truncation_and_skipping_are_counted():
    records = [
        {"prompt": "p", "completion": "long completion"},  # cut at max_len: truncated, kept
        {"prompt": "a very long prompt indeed", "completion": "x"},  # no label left: skipped
        {"prompt": "p", "completion": "ok"},
    ]
    data = tokenize(records, TOK, max_len=8)
    # the skipped record was cut too, but it is counted once, as skipped
    assert (data.n_records, data.n_truncated, data.n_skipped, len(data)) == (3, 1, 1, 2)
    assert all(len(ids) <= 8 for ids, _ in data.examples)
    assert data.records == [records[0], records[2]]
    assert data.summary().startswith("2 examples (prompt_completion)")
    assert "truncated: 1 of the examples; skipped: 1 of 3 records" in data.summary()


def test_collate_right_pads_with_pad_id_and_ignored_labels():
    a, b = one({"text": "abcdef"}), one({"text": "ab"})
    input_ids, labels = collate([a, b])
    assert input_ids.shape == labels.shape == (2, len(a[0]))
    assert input_ids[1, len(b[0]) :].eq(0).all() and labels[1, len(b[1]) :].eq(IGNORE_INDEX).all()
    assert input_ids[1, : len(b[0])].tolist() == b[0]
    assert n_targets(labels) == n_targets(a[1]) + n_targets(b[1])


def test_sampler_covers_each_epoch_once_and_is_a_function_of_the_step():
    lengths = [3, 9, 1, 7, 5, 2, 8, 4, 6, 10]
    s = StepSampler(lengths, global_batch=4, seed=1)
    stream = [i for step in range(5) for i in s.indices(step)]  # 20 = two epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch its own permutation
    fresh = StepSampler(lengths, global_batch=4, seed=1)
    assert fresh.indices(3) == s.indices(3)  # no hidden state: resume needs only the step
    assert s.position(3) == (1, 2)
    assert StepSampler(lengths, 4, seed=2).indices(0) != s.indices(0)


def test_group_by_length_reduces_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (256,), generator=g).tolist()

    def padding(sampler):
        steps = range(256 // 8)
        return sum(8 * max(lengths[i] for i in sampler.indices(k)) for k in steps) - sum(lengths)

    plain, grouped = StepSampler(lengths, 8, seed=0), StepSampler(lengths, 8, seed=0, group_by_length=True)
    assert sorted(i for k in range(32) for i in grouped.indices(k)) == list(range(256))
    assert padding(grouped) < 0.2 * padding(plain)


@pytest.mark.parametrize("n", [100, 484])
def test_group_by_length_with_a_short_last_batch(n):
    # n is not a multiple of G = 8: the short batch of an epoch must not shift every later batch
    # across two length groups, in this epoch or the next (whose batches start mid-way in the stream).
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (n,), generator=g).tolist()
    steps = range(2 * n // 8)  # two epochs

    def padding(sampler):
        return sum(
            8 * max(lengths[i] for i in sampler.indices(k)) - sum(lengths[i] for i in sampler.indices(k))
            for k in steps
        )

    plain, grouped = StepSampler(lengths, 8, seed=0), StepSampler(lengths, 8, seed=0, group_by_length=True)
    stream = [i for k in steps for i in grouped.indices(k)]
    assert sorted(stream[:n]) == sorted(stream[n : 2 * n]) == list(range(n))  # each epoch once
    assert padding(grouped) < 0.2 * padding(plain)


# -----------------------------------------------------------------------------
# bad input


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return p


def test_malformed_json_names_file_and_line(tmp_path):
    p = write(tmp_path, [json.dumps({"text": "a"}), "", '{"text": "b"', json.dumps({"text": "c"})])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: malformed JSON"):
        load_dataset(p, TOK)
    p = write(tmp_path, ["[1, 2]"], "list.jsonl")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        load_dataset(p, TOK)


def test_missing_field_names_the_field_and_the_format(tmp_path):
    p = write(tmp_path, [json.dumps({"prompt": "a", "completion": "b"}), json.dumps({"prompt": "c"})])
    with pytest.raises(
        ValueError, match=r"record 2 has no 'completion' field, which the prompt_completion format"
    ):
        load_dataset(p, TOK)
    with pytest.raises(ValueError, match=r"no 'output' field, which the alpaca format"):
        tokenize([{"instruction": "x"}], TOK, format="alpaca")
    with pytest.raises(ValueError, match=r"no 'target' field, which the template format"):
        tokenize([{"input": "x"}], TOK, template="{input} {target}")
    with pytest.raises(ValueError, match="cannot tell the format"):
        tokenize([{"question": "x"}], TOK)
    with pytest.raises(ValueError, match="at least one assistant/model message"):
        tokenize([{"messages": [{"role": "user", "content": "hi"}]}], TOK)
    with pytest.raises(ValueError, match="unknown role 'bot'"):
        tokenize([{"messages": [{"role": "bot", "content": "hi"}]}], TOK)


def test_chat_records_follow_the_templates_rules(tmp_path):
    # The rules of Gemma's template (Tokenizer.apply_chat_template, used at generation time too),
    # with the file and line of the record.
    user, model = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
    late_system = {"messages": [user, model, {"role": "system", "content": "c"}, model]}
    model_first = {"messages": [model, user, model]}
    two_users = {"messages": [user, user, model]}
    good = json.dumps({"messages": [user, model]})
    p = write(tmp_path, [good, "", json.dumps(late_system)])
    with pytest.raises(
        ValueError, match=r"d\.jsonl:3: record 2: message 2: a system message is only allowed first"
    ):
        load_dataset(p, TOK)
    for record in (model_first, two_users):
        p = write(tmp_path, [good, json.dumps(record)])
        with pytest.raises(ValueError, match=r"d\.jsonl:2: record 2: message \d has role .* must alternate"):
            load_dataset(p, TOK)
    no_chat = type("NoChatTokenizer", (), {"bos_id": 2, "eos_id": 1, "encode": CharTokenizer.encode})()
    with pytest.raises(ValueError, match="needs a tokenizer with apply_chat_template"):
        tokenize([{"messages": [user, model]}], no_chat)


def test_empty_dataset_and_bad_templates(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_dataset(write(tmp_path, ["", "  "]), TOK)
    with pytest.raises(ValueError, match="empty"):
        tokenize([], TOK)
    with pytest.raises(ValueError, match="no {field} placeholder"):
        tokenize([{"a": 1}], TOK, template="no fields here")
    with pytest.raises(ValueError, match="malformed"):
        tokenize([{"a": 1}], TOK, template="{a")
    with pytest.raises(ValueError, match="format='template' needs a template"):
        tokenize([{"a": 1}], TOK, format="template")
    with pytest.raises(ValueError, match="no example has a completion token left"):
        tokenize([{"prompt": "long prompt", "completion": "x"}], TOK, max_len=4)


@pytest.mark.slow
def test_real_tokenizer_chat_and_prompt_encoding():
    """With Gemma's own tokenizer: the chat segments give exactly the ids of Tokenizer.apply_chat_template's
    text, a sequence starts with a single <bos>, and the learned tokens are the model turns."""
    from minilora.gguf import default_model_dir
    from minilora.tokenizer import Tokenizer

    tok = Tokenizer(default_model_dir())
    messages = [
        {"role": "system", "content": "Answer briefly. "},
        {"role": "user", "content": " What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6\n"},
    ]
    data = tokenize([{"messages": messages}], tok)
    ids, labels = data[0]
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # the same token ids as encoding the whole text at once (segments never split a token differently)
    assert ids == tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False))
    assert [x for x in labels if x != IGNORE_INDEX] == tok.encode(
        "4<end_of_turn>6<end_of_turn>", add_bos=False
    )
    ids, labels = tokenize([{"prompt": "Date 2039-02-10 in words:", "completion": " the 10th"}], tok)[0]
    assert ids.count(tok.bos_id) == 1 and ids[-1] == tok.eos_id
    assert tok.decode([x for x in labels if x != IGNORE_INDEX]) == tok.decode(
        tok.encode(" the 10th", add_bos=False) + [1]
    )


# ---- issue 9 (6, 7, 9): every value of a data file is checked where it is read


@pytest.mark.parametrize(
    "line, shown",
    [  # trained on as the strings 'None', "['a', 'b']", 'nan' before
        ('{"prompt": "a", "completion": null}', "null"),
        ('{"prompt": ["a", "b"], "completion": "c"}', r'\["a", "b"\]'),
        ('{"prompt": "a", "completion": {"x": 1}}', r'\{"x": 1\}'),
        ('{"prompt": "a", "completion": NaN}', "NaN"),
        ('{"prompt": "a", "completion": Infinity}', "Infinity"),
        ('{"prompt": "a", "completion": 7}', "7"),
    ],
)
def test_data_values_must_be_strings(tmp_path, line, shown):
    p = write(tmp_path, [json.dumps({"prompt": "x", "completion": "y"}), line])
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: record 2: field '\w+' must be a string, got {shown}"):
        load_dataset(p, TOK)
    with pytest.raises(ValueError, match=r"'text' must be a string, got null"):
        tokenize([{"text": None}], TOK)
    with pytest.raises(ValueError, match=r"'b' must be a string, got 3"):
        tokenize([{"a": "x", "b": 3}], TOK, template="{a} {b}")
    # alpaca's "input" may be missing, empty or null (documented), nothing else
    assert one({"instruction": "i", "input": None, "output": "o"}) == one({"instruction": "i", "output": "o"})
    with pytest.raises(ValueError, match=r"'input' must be a string, got \[\]"):
        tokenize([{"instruction": "i", "input": [], "output": "o"}], TOK)


@pytest.mark.parametrize(
    "raw, where",
    [
        (
            '{"text": "ok"}\n{"text": "caf\xe9"}\n'.encode("latin-1"),
            r"d\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 14\)",
        ),
        ('{"text": "ok"}\n'.encode("utf-16"), r"d\.jsonl:1: not UTF-8 text \(byte 0xff at column 1\)"),
        (
            b'{"text": "ok"}\n' * 3 + bytes(range(256)),
            r"d\.jsonl:5: not UTF-8 text \(byte 0x80 at column 118\)",
        ),
    ],
    ids=["latin-1", "utf-16", "binary"],
)
def test_undecodable_text_names_the_file_and_line(tmp_path, raw, where):
    (tmp_path / "d.jsonl").write_bytes(raw)  # used to be a bare UnicodeDecodeError ... position 507
    with pytest.raises(ValueError, match=where + ".*save the file as UTF-8"):
        load_dataset(tmp_path / "d.jsonl", TOK)


def test_deep_nesting_and_duplicate_keys_name_the_file_and_line(tmp_path):
    deep = '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"  # used to be a bare RecursionError
    with pytest.raises(ValueError, match=r"d\.jsonl:2: nested too deeply"):
        load_dataset(write(tmp_path, ['{"text": "a"}', deep]), TOK)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: key 'text' appears twice"):
        load_dataset(write(tmp_path, ['{"text": "a", "text": "b"}']), TOK)


def test_a_json_array_file_is_read_with_the_line_of_each_record(tmp_path):
    records = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    array = tmp_path / "d.json"
    array.write_text(json.dumps(records, indent=2), encoding="utf-8-sig")  # with a byte-order mark
    lines = write(tmp_path, [json.dumps(r) for r in records])
    assert load_dataset(array, TOK).examples == load_dataset(lines, TOK).examples
    array.write_text(json.dumps([*records, {"prompt": "p3"}], indent=2))
    with pytest.raises(ValueError, match=r"d\.json:10: record 3 has no 'completion' field"):
        load_dataset(array, TOK)
    array.write_text('[\n{"text": "a"},\n{"text": "b"\n]')
    with pytest.raises(ValueError, match=r"d\.json:4: malformed JSON"):
        load_dataset(array, TOK)
    array.write_text('[{"text": "a"}, 3]')
    with pytest.raises(ValueError, match=r"d\.json:1: expected a JSON object, got int"):
        load_dataset(array, TOK)


def test_load_split_holds_out_a_seeded_slice(tmp_path):
    from minilora.data import load_split

    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    p = write(tmp_path, [json.dumps(r) for r in records])
    train, held = load_split(p, TOK, 0.1, seed=3)
    assert (len(train), len(held)) == (18, 2) and (train.n_records, held.n_records) == (18, 2)
    assert sorted(map(str, train.records + held.records)) == sorted(map(str, records))
    assert (
        load_split(p, TOK, 0.1, seed=3)[1].records
        == held.records
        != load_split(p, TOK, 0.1, seed=4)[1].records
    )
    assert load_split(p, TOK, 0.01)[1] is None  # nothing to hold out
    assert load_split(p, TOK, 0.0)[0].examples == load_dataset(p, TOK).examples


def test_generation_prompt_is_the_prompt_of_training():
    from minilora.data import generation_prompt

    records = {
        "prompt_completion": {"prompt": "Q?", "completion": "A"},
        "alpaca": {"instruction": "Q?", "output": "A"},
        "chat": {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A"}]},
        "text": {"text": "Q?"},
    }
    for fmt, record in records.items():
        ids, labels = one(record)
        first_learned = next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)
        expected = TOK.decode(ids[1:first_learned]) if fmt != "text" else "Q?"  # after <bos>
        assert generation_prompt("Q?", fmt, tok=TOK) == expected, fmt
    template = "### q: {q}\n### a: {a}"
    assert generation_prompt("Q?", "template", template) == "### q: Q?\n### a: "
    two = "{x} and {y} -> {z}"
    assert generation_prompt('{"x": "1", "y": "2"}', "template", two) == "1 and 2 -> "
    with pytest.raises(ValueError, match=r"needs the fields \['x', 'y'\]; give them as a JSON object"):
        generation_prompt("1 and 2", "template", two)
