"""Gemma's tokenizer: a SentencePiece model plus the special-token rules around it.

SentencePiece never produces a *control* piece from text: `<bos>`, `<eos>`, `<start_of_turn>` and
`<end_of_turn>` are control pieces in Gemma's `tokenizer.model`, so encoding the text
"<start_of_turn>" with SentencePiece alone gives seven ordinary pieces. Like Hugging Face's
GemmaTokenizer, we first split the text on the strings of every control (and the unknown) piece, map
each to its single id, and let SentencePiece encode the text between them. User-defined pieces
(`"\\n"`, runs of spaces and tabs, `<start_of_image>`, HTML tags) SentencePiece already matches in
text on its own.

The `<bos>` rule: `encode(text, add_bos=True)` puts exactly one `<bos>` first. When the text itself
starts with "<bos>" (the chat template writes it, as Gemma's official template does), that one is
the `<bos>` and none is added, so `encode(apply_chat_template(messages))` and
`encode(apply_chat_template(messages), add_bos=False)` give the same ids with a single `<bos>`.

Chat format (Gemma's official template):
    <bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n{reply}<end_of_turn>\\n
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

# Gemma's chat roles: the template writes "model" where the messages say "assistant".
_ROLE_NAMES = {"user": "user", "assistant": "model", "model": "model"}


class Tokenizer:
    """SentencePiece tokenizer with Gemma's special tokens and chat template.

    `Tokenizer(path)` takes a checkpoint folder holding `tokenizer.model`, the model file itself, or a
    GGUF file (whose metadata holds the tokenizer).
    """

    def __init__(self, dir_or_model_file: str | os.PathLike):
        path = Path(dir_or_model_file)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {model_file}: pass a checkpoint folder that holds "
                "tokenizer.model (minilora.gguf.default_model_dir() makes one for Gemma 3 270M), "
                "the path of a .model file or a .gguf file"
            )
        import sentencepiece as spm  # needed here only: `import minilora` works without it

        self.model_file = model_file
        if model_file.suffix == ".gguf":  # the tokenizer in a GGUF file's metadata
            from minilora.gguf import GGUFFile, sentencepiece_model

            self.sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(GGUFFile(model_file)))
        else:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size: int = self.sp.get_piece_size()

        self.pad_id: int = self.sp.pad_id()
        self.eos_id: int = self.sp.eos_id()
        self.bos_id: int = self.sp.bos_id()
        self.unk_id: int = self.sp.unk_id()
        for name, i in (("bos", self.bos_id), ("eos", self.eos_id)):
            if i < 0:
                raise ValueError(f"{model_file} defines no {name} piece; Gemma's tokenizer has one")
        self.end_of_turn_id: int | None = self._find("<end_of_turn>")
        self.start_of_turn_id: int | None = self._find("<start_of_turn>")
        # Generation stops at either: base models end with <eos>, instruction-tuned ones with <end_of_turn>.
        self.stop_ids: frozenset[int] = frozenset(
            i for i in (self.eos_id, self.end_of_turn_id) if i is not None
        )

        # Pieces SentencePiece would never produce from text: control pieces and <unk>.
        self.special_ids: frozenset[int] = frozenset(
            i for i in range(self.vocab_size) if self.sp.is_control(i) or self.sp.is_unknown(i)
        )
        self._special_to_id = {self.sp.id_to_piece(i): i for i in self.special_ids}
        # Longest first, so that a special string which is a prefix of another cannot win.
        alternatives = sorted(self._special_to_id, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _find(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    # ---- pieces and ids ----------------------------------------------------------------------
    def id_to_piece(self, i: int) -> str:
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        i = self._find(piece)
        if i is None:
            raise KeyError(f"{piece!r} is not a piece of {self.model_file}")
        return i

    # ---- encode / decode ---------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Text -> ids. Special-token strings written in the text become their single ids.

        With `add_bos`, the result starts with exactly one `<bos>`: it is not added again when the
        text itself starts with "<bos>".
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids: list[int] = []
        # re.split with one capturing group alternates: text, special, text, special, ..., text
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                ids.append(self._special_to_id[part])
            elif part:
                ids.extend(self.sp.encode(part))
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. Special tokens are written as their strings ("<end_of_turn>"), or left out
        with `skip_special`. With Gemma's tokenizer (no normalization, byte fallback) decoding inverts
        encoding: `decode(encode(text, add_bos=False)) == text` for any text."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise IndexError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        out: list[str] = []
        run: list[int] = []  # ordinary ids, decoded together so byte-fallback pieces join into UTF-8
        for i in ids:
            if i in self.special_ids:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    # ---- chat --------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Gemma's chat format, as its official Jinja template writes it.

        `messages` is a list of {"role", "content"} dicts; roles alternate user / assistant (or
        "model"), starting with user. A content is a str or a list of {"type": "text", "text"} parts.
        A leading "system" message has no turn of its own in Gemma: its text, unstripped, is put
        before the first user message, separated by a blank line; of a list, the official template
        takes the first part only. Turn contents are stripped of surrounding whitespace, a list part
        by part (then joined), as the official template does. The text starts with "<bos>" (see
        `encode` for why that never doubles it) and, with `add_generation_prompt`, ends with
        "<start_of_turn>model\\n" so that the model writes the next reply.
        """
        if self.start_of_turn_id is None or self.end_of_turn_id is None:
            raise ValueError(f"{self.model_file} has no <start_of_turn>/<end_of_turn> pieces for chat")
        messages = list(messages)
        system = ""
        if messages and _role(messages[0]) == "system":
            system = _content(messages[0], system=True) + "\n\n"
            messages = messages[1:]
            if not messages:
                raise ValueError("a system message must be followed by a user message")
        text = "<bos>"
        for k, message in enumerate(messages):
            role = _role(message)
            if role == "system":
                raise ValueError(f"message {k}: a system message is only allowed first")
            if role not in _ROLE_NAMES:
                raise ValueError(
                    f"message {k}: unknown role {role!r}; Gemma's chat format knows "
                    "'system' (first only), 'user' and 'assistant' (or 'model')"
                )
            expected = "user" if k % 2 == 0 else "model"
            if _ROLE_NAMES[role] != expected:
                raise ValueError(
                    f"message {k} has role {role!r} but roles must alternate user/assistant/user/..., "
                    "starting with user"
                )
            prefix = system if k == 0 else ""
            text += f"<start_of_turn>{_ROLE_NAMES[role]}\n{prefix}{_content(message)}<end_of_turn>\n"
        if add_generation_prompt:
            text += "<start_of_turn>model\n"
        return text

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_file)!r}, vocab_size={self.vocab_size})"


def _role(message: dict) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
        raise ValueError(f"a chat message is a dict with 'role' and 'content' (role: a str), got {message!r}")
    return message["role"]


def _content(message: dict, system: bool = False) -> str:
    """A message's text as Gemma's official template writes it. A turn's content: a str, stripped,
    or a list of {"type": "text", "text": ...} parts, each stripped, then joined. The system
    message's: the str as it is, or the first part's text as it is."""
    content = message["content"]
    if isinstance(content, str):
        return content if system else content.strip()
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        if not system:
            return "".join(p["text"].strip() for p in content)
        if content:
            return content[0]["text"]
    raise ValueError(f"message content must be a str or a list of text parts, got {content!r}")
