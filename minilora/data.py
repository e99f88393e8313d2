"""Supervised fine-tuning data: JSON lines -> token ids + labels (prompt masked) -> padded batches.

A data file holds one JSON object per line, or one JSON array of objects (as many published datasets
do); the values a format reads are strings. Formats ("auto" picks it from the first record's fields):

    text               {"text": ...}                                  every token is learned
    prompt_completion  {"prompt": ..., "completion": ...}
    alpaca             {"instruction": ..., "input": ..., "output": ...}  (Stanford Alpaca's prompt)
    chat               {"messages": [{"role": ..., "content": ...}, ...]}  (Gemma's chat template)
    template           any fields, rendered by a user template such as
                       "### context: {input}\\n### question: {target}"

Template rule: the LAST placeholder is the completion (with whatever literal text follows it); the
text before it, with the other fields filled in, is the prompt. Write literal braces as {{ and }}.

A record becomes segments of text, each marked prompt or completion. Each segment is tokenized on
its own and the ids concatenated: [bos] + prompt ids + completion ids + [eos]. That is exactly the
split the model sees at generation time (the prompt is encoded alone, the reply is generated), so
no token straddles the prompt/completion boundary. Labels are the ids on completion segments and
-100 (ignored by the loss) on prompt segments; `<eos>` (`<end_of_turn>` after each model turn of a
chat) is appended to completions so the model learns to stop. Labels are aligned with the inputs;
the model shifts them inside (as Hugging Face models do).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import string
from dataclasses import dataclass, field

import torch

from minilora.checkpoint import json_loads
from minilora.gemma import IGNORE_INDEX

log = logging.getLogger(__name__)

# The fields each format needs (alpaca's "input" may be missing or empty), in the order "auto" tries them.
REQUIRED = {
    "chat": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
FORMATS = ("auto", *REQUIRED, "template")

# Stanford Alpaca's prompts (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Segment = tuple[str, bool]  # (text, is_completion)


# -----------------------------------------------------------------------------
# reading


def read_records(path: str | os.PathLike) -> tuple[list[dict], list[int]]:
    """(records, the line each starts on) of a data file: JSON lines (blank lines skipped) or one JSON
    array of objects. Errors name the file and line: not UTF-8, malformed JSON, not an object."""
    with open(path, "rb") as f:
        text = "".join(_utf8(raw, path, lineno) for lineno, raw in enumerate(f, 1))
    if text.lstrip().startswith("["):
        records, lines = _json_array(text, path)
    else:
        numbered = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
        lines, records = [n for n, _ in numbered], [_parse(line, path, n) for n, line in numbered]
    if not records:
        raise ValueError(f"{path} holds no records: the dataset is empty")
    for record, lineno in zip(records, lines, strict=True):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return records, lines


def _utf8(raw: bytes, path, lineno: int) -> str:
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a byte-order mark is no text
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
            "save the file as UTF-8"
        ) from None


def _parse(text: str, path, lineno: int, start: int | None = None):
    """The JSON value in `text` (or, from `start` on, the first one and where it ends)."""
    try:
        return json_loads(text, start)
    except json.JSONDecodeError as e:  # (e.lineno counts from the start of `text`)
        line = lineno if start is None else e.lineno
        raise ValueError(f"{path}:{line}: malformed JSON ({e.msg} at column {e.colno})") from None
    except ValueError as e:  # a key given twice, deep nesting
        raise ValueError(f"{path}:{lineno}: {e}") from None


def _json_array(text: str, path) -> tuple[list, list[int]]:
    """The elements of the JSON array in `text` and the line each starts on."""
    blank, records, lines, line, at = re.compile(r"\s*"), [], [], 1, 0
    i = blank.match(text, text.index("[") + 1).end()
    while text[i : i + 1] != "]":
        line, at = line + text.count("\n", at, i), i
        record, i = _parse(text, path, line, start=i)
        records.append(record)
        lines.append(line)
        i = blank.match(text, i).end()
        if text[i : i + 1] == ",":
            i = blank.match(text, i + 1).end()
        elif text[i : i + 1] != "]":
            raise ValueError(f"{path}:{line}: expected ',' or ']' after this record of the JSON array")
    if text[i + 1 :].strip():
        raise ValueError(f"{path}: extra data after the JSON array")
    return records, lines


def template_fields(template: str) -> list[str]:
    """Placeholder names of a template in order; the last one is the completion."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(
            f"template {template!r} is malformed ({e}); write literal braces as {{{{ and }}}}"
        ) from None
    if not names:
        raise ValueError(
            f"template {template!r} has no {{field}} placeholder; the last one names the completion"
        )
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"template placeholders must be plain field names, got {bad}")
    return names


def detect_format(record: dict, template: str | None = None) -> str:
    if template is not None:
        return "template"
    for fmt, fields in REQUIRED.items():
        if all(f in record for f in fields):
            return fmt
    raise ValueError(
        f"cannot tell the format of a record with fields {sorted(record)}; expected the fields of one "
        f"of {list(REQUIRED.values())}, or pass a template naming the fields"
    )


# -----------------------------------------------------------------------------
# records -> segments


def segments(record: dict, fmt: str, template: str | None = None, *, tok=None) -> list[Segment]:
    """A record as [(text, is_completion), ...]; raises KeyError naming a missing field. The chat
    format needs `tok`: its apply_chat_template writes the text."""

    def need(name: str, default=None) -> str:
        if name not in record and default is None:
            raise KeyError(name)
        value = record.get(name, default)
        if not isinstance(value, str) and not (default is not None and value is None):
            raise ValueError(f"field {name!r} must be a string, got {json.dumps(value, default=repr)[:80]}")
        return value or ""

    if fmt == "text":
        return [(need("text"), True)]
    if fmt == "prompt_completion":
        return [(need("prompt"), False), (need("completion"), True)]
    if fmt == "alpaca":  # "input" may be missing, empty or null
        instruction, output, inp = need("instruction"), need("output"), need("input", default="")
        prompt = ALPACA_PROMPT if inp else ALPACA_PROMPT_NO_INPUT
        return [(prompt.format(instruction=instruction, input=inp), False), (output, True)]
    if fmt == "chat":
        if "messages" not in record:
            raise KeyError("messages")
        return _chat_segments(record["messages"], tok)
    if fmt == "template":
        if template is None:
            raise ValueError(
                "format='template' needs a template, e.g. '### context: {input}\\n### answer: {target}'"
            )
        *prompt_fields, target = template_fields(template)
        values = {name: need(name) for name in [*prompt_fields, target]}
        # Split the template at its last placeholder: before it is the prompt, from it on the completion.
        cut = template.rfind("{" + target)
        prompt = template[:cut].format(**values)
        completion = template[cut:].format(**values)
        return [(prompt, False), (completion, True)]
    raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")


def _chat_segments(messages, tok) -> list[Segment]:
    """Gemma's chat text cut into turns, the model turns learned. The text and its rules (roles
    alternate user/model starting with user, a system message only first and folded into the first
    user turn, contents stripped) are the tokenizer's apply_chat_template, as at generation time."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    if not hasattr(tok, "apply_chat_template"):
        raise ValueError(
            f"the chat format needs a tokenizer with apply_chat_template (minilora.Tokenizer), "
            f"got {type(tok).__name__}"
        )

    def text(k: int) -> str:  # the first k messages, as a conversation so far (no <bos>)
        return tok.apply_chat_template(messages[:k], add_generation_prompt=False).removeprefix("<bos>")

    text(len(messages))  # checks the whole conversation before it is cut up
    out: list[Segment] = []
    done = ""
    for k in range(len(messages)):
        if k == 0 and messages[0]["role"] == "system":
            continue  # no turn of its own: its text goes into the first user turn
        upto = text(k + 1)
        if not upto.startswith(done):  # the template must write a conversation turn after turn
            raise RuntimeError(f"the chat template rewrote earlier turns at message {k}; cannot mask turns")
        turn = upto[len(done) :]  # "<start_of_turn>{role}\n{content}<end_of_turn>\n"
        done = upto
        header, body = turn.split("\n", 1)
        out += [(header + "\n", False), (body[:-1], header.endswith("model")), (body[-1:], False)]
    if not any(learned for _, learned in out):
        raise ValueError("a chat record needs at least one assistant/model message to learn from")
    return out


def prompt_and_target(record: dict, fmt: str, template: str | None = None, *, tok=None) -> tuple[str, str]:
    """(prompt text, expected completion) for evaluating generation: the prompt is everything
    before the first completion segment (for chat it ends with "<start_of_turn>model\\n")."""
    segs = segments(record, fmt, template, tok=tok)
    i = next(i for i, (_, learned) in enumerate(segs) if learned)
    target = segs[i][0].removesuffix("<end_of_turn>")
    return "".join(text for text, _ in segs[:i]), target


def generation_prompt(text: str, fmt: str, template: str | None = None, *, tok=None) -> str:
    """The prompt that a model trained on format `fmt` saw for the input `text` (the instruction, the
    user's message, the template's field): what minilora-generate sends with an adapter that records
    its format. A template with several prompt fields takes `text` as a JSON object of them."""
    if fmt == "text":
        return text
    if fmt == "template":
        *fields, target = template_fields(template)
        values = {fields[0]: text} if len(fields) == 1 else json_loads(text) if text.startswith("{") else None
        if not isinstance(values, dict):
            raise ValueError(f"template {template!r} needs the fields {fields}; give them as a JSON object")
        return prompt_and_target({**values, target: ""}, fmt, template)[0]
    records = {
        "prompt_completion": {"prompt": text, "completion": ""},
        "alpaca": {"instruction": text, "output": ""},
        "chat": {"messages": [{"role": "user", "content": text}, {"role": "model", "content": "…"}]},
    }
    if fmt not in records:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    return prompt_and_target(records[fmt], fmt, tok=tok)[0]


# -----------------------------------------------------------------------------
# segments -> ids and labels


def encode(
    segs: list[Segment], tok, *, max_len: int, mask_prompt: bool = True, eos_id: int | None = None
) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated): [bos] + segment ids (+ [eos_id], learned). Sequences are cut
    at max_len tokens (the end goes)."""
    ids, labels = [tok.bos_id], [IGNORE_INDEX]
    for text, learned in segs:
        piece = tok.encode(text, add_bos=False)
        ids += piece
        labels += piece if (learned or not mask_prompt) else [IGNORE_INDEX] * len(piece)
    if eos_id is not None:
        ids.append(eos_id)
        labels.append(eos_id)
    truncated = len(ids) > max_len
    return ids[:max_len], labels[:max_len], truncated


@dataclass
class SFTData:
    """Tokenized examples plus what happened on the way (reported by train_gemma.py)."""

    # (input_ids, labels) per kept example, labels aligned with input_ids (-100 = no loss).
    examples: list[tuple[list[int], list[int]]]
    # The source records of the kept examples (for generation-based evaluation).
    records: list[dict] = field(default_factory=list)
    # Format actually used ("auto" resolved).
    format: str = "text"
    # Template of the "template" format, else None.
    template: str | None = None
    # Records read; kept examples cut at max_len; records dropped because no label token was left.
    n_records: int = 0
    n_truncated: int = 0
    n_skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.examples]

    def summary(self) -> str:
        n_tokens = sum(self.lengths)
        n_labels = sum(sum(1 for x in labels if x != IGNORE_INDEX) for _, labels in self.examples)
        return (
            f"{len(self)} examples ({self.format}), {n_tokens} tokens, {n_labels} with loss; "
            f"truncated: {self.n_truncated} of the examples; "
            f"skipped: {self.n_skipped} of {self.n_records} records (no completion token left)"
        )


def tokenize(
    records: list[dict],
    tok,
    *,
    format: str = "auto",
    template: str | None = None,
    max_len: int = 1024,
    mask_prompt: bool = True,
    add_eos: bool = True,
    source: str = "<records>",
    lines: list[int] | None = None,
) -> SFTData:
    """Records -> SFTData. Errors name the record (source:line with `lines`, the records' line numbers
    in the file; else source: record index), the missing field and the format."""
    if not records:
        raise ValueError(f"{source} holds no records: the dataset is empty")
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; expected one of {FORMATS}")
    if template is not None:
        if format not in ("auto", "template"):
            raise ValueError(f"a template was given with format={format!r}; use format='template'")
        template_fields(template)
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 tokens, got {max_len}")
    fmt = detect_format(records[0], template) if format == "auto" else format
    data = SFTData(examples=[], format=fmt, template=template, n_records=len(records))
    # Chat replies already end in <end_of_turn>, the stop token of a chat model.
    eos_id = tok.eos_id if add_eos and fmt != "chat" else None
    for i, record in enumerate(records):
        where = f"{source}:{lines[i]}: record {i + 1}" if lines else f"{source}: record {i + 1}"
        try:
            segs = segments(record, fmt, template, tok=tok)
        except KeyError as e:
            need = template_fields(template) if fmt == "template" else list(REQUIRED[fmt])
            raise ValueError(
                f"{where} has no {e.args[0]!r} field, which the {fmt} format needs "
                f"(fields {need}); it has {sorted(record)}"
            ) from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        ids, labels, truncated = encode(segs, tok, max_len=max_len, mask_prompt=mask_prompt, eos_id=eos_id)
        if n_targets(labels) == 0:
            data.n_skipped += 1
            continue
        data.n_truncated += truncated
        data.examples.append((ids, labels))
        data.records.append(record)
    if data.n_skipped:
        log.warning(f"{source}: {data.n_skipped} of {len(records)} records have no completion token left "
                    f"after truncation to {max_len}; skipped")  # fmt: skip
    if not data.examples:
        raise ValueError(
            f"{source}: no example has a completion token left (all {len(records)} skipped); raise max_len"
        )
    return data


def load_dataset(path: str | os.PathLike, tok, **kwargs) -> SFTData:
    """The records of a data file (read_records), tokenized; keyword arguments as tokenize(). Errors
    name the file and line."""
    return load_split(path, tok, 0.0, **kwargs)[0]


def load_split(path: str | os.PathLike, tok, held_out: float, *, seed: int = 0, **kwargs):
    """(train, held-out) SFTData of one data file: a `held_out` fraction of its records (rounded
    down), drawn by `seed`, is tokenized apart; held-out is None when that is no record."""
    records, lines = read_records(path)
    n = int(len(records) * held_out)
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = [sorted(order[n:]), sorted(order[:n])]
    return tuple(
        tokenize([records[i] for i in part], tok, source=str(path), lines=[lines[i] for i in part], **kwargs)
        if part
        else None
        for part in parts
    )


# -----------------------------------------------------------------------------
# batches


def collate(
    examples: list[tuple[list[int], list[int]]], pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the batch's longest sequence: input_ids with pad_id, labels with -100.
    Right padding under causal attention changes nothing at the real positions, so no mask is needed."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for b, (ids, lab) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(lab)] = torch.tensor(lab)
    return input_ids, labels


def n_targets(labels) -> int:
    """Positions the loss counts: labels after the shift (position 0 is never predicted)."""
    if isinstance(labels, torch.Tensor):
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


class StepSampler:
    """Which examples form global batch number `step`, as a pure function of (seed, step): each
    epoch is a seeded permutation, the epochs are laid end to end, and batch `step` is the slice
    [step * G, (step + 1) * G) of that stream. Resuming needs nothing but the step.

    group_by_length: within windows of 32 batches of the permutation, examples are sorted by length
    and cut into batches, which are shuffled, so a batch holds sequences of similar length (less
    padding). The cuts follow the stream's batch boundaries: when the dataset size is not a multiple
    of G, an epoch's first examples complete the previous epoch's last batch and its own short batch
    goes last, so no other batch mixes two length groups.
    """

    def __init__(self, lengths: list[int], global_batch: int, seed: int = 0, group_by_length: bool = False):
        if global_batch <= 0:
            raise ValueError(f"global batch must be positive, got {global_batch}")
        self.lengths, self.G, self.seed, self.group = list(lengths), global_batch, seed, group_by_length
        self._epochs: dict[int, list[int]] = {}

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(self.lengths), generator=g).tolist()
            if self.group:
                order = self._grouped(order, epoch, g)
            self._epochs = {epoch: order}  # keep one epoch: memory stays O(dataset)
        return self._epochs[epoch]

    def _grouped(self, order: list[int], epoch: int, g: torch.Generator) -> list[int]:
        N, G = len(order), self.G
        head = min(-epoch * N % G, N)  # examples before this epoch's first batch boundary
        grouped, short = order[:head], []
        window = 32 * G
        for start in range(head, N, window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            batches = [chunk[j : j + G] for j in range(0, len(chunk), G)]
            if len(batches[-1]) < G:  # only in the last window
                short = batches.pop()
            for k in torch.randperm(len(batches), generator=g).tolist():
                grouped += batches[k]
        return grouped + short

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, offset in that epoch) of the first example of batch `step`."""
        return divmod(step * self.G, len(self.lengths))

    def indices(self, step: int) -> list[int]:
        epoch, offset = self.position(step)
        out: list[int] = []
        while len(out) < self.G:
            order = self.epoch_order(epoch)
            out += order[offset : offset + self.G - len(out)]
            epoch, offset = epoch + 1, 0
        return out

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * len(self.lengths) / self.G))
