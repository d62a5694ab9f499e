"""The tokenization the original LLaVA used: transformers 4.3x's slow SentencePiece LlamaTokenizer.

`llava` tokenization mode must reproduce the ids a checkpoint was trained on. The fast
(tokenizers-backed) Llama tokenizer of transformers 5 splits some whitespace runs differently
from SentencePiece itself (e.g. "\\n    printf"), so for SentencePiece vocabularies we call
SentencePiece directly, following the slow tokenizer's rules, and keep each piece's offsets
so that labels come from the same span mechanism as everywhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPIECE_UNDERLINE = "\u2581"
Offset = tuple[int, int] | None


def sentencepiece_file(tokenizer: Any) -> Path | None:
    """The `tokenizer.model` behind a HF tokenizer, when it has one."""
    candidates = [getattr(tokenizer, "vocab_file", None)]
    name = getattr(tokenizer, "name_or_path", None)
    if name:
        candidates.append(str(Path(name) / "tokenizer.model"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


class OriginalSentencePieceTokenizer:
    """Callable like a HF tokenizer (`input_ids`, `offset_mapping`) with the slow one's ids.

    Rules reproduced (transformers 4.37 `LlamaTokenizer`): special tokens split the text;
    `legacy=True` adds SentencePiece's dummy prefix to every piece of text between special
    tokens; `legacy=False` adds one "▁" to the whole text only; BOS is prepended.
    """

    def __init__(self, model_file: Path, legacy: bool, special_tokens: dict[str, int],
                 bos_id: int | None, unk_token: str = "<unk>") -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(str(model_file))
        self.legacy = legacy
        if not legacy:
            self._disable_dummy_prefix()
        self.special = dict(sorted(special_tokens.items(), key=lambda kv: -len(kv[0])))
        self.bos_token_id = bos_id
        self.unk_token = unk_token
        self.unk_length = len(self.sp.encode(unk_token))

    @classmethod
    def from_hf(cls, tokenizer: Any) -> OriginalSentencePieceTokenizer | None:
        """Build one for a HF tokenizer backed by a SentencePiece model, else None."""
        model_file = sentencepiece_file(tokenizer)
        if model_file is None:
            return None
        return cls(model_file, bool(getattr(tokenizer, "legacy", True)),
                   dict(tokenizer.added_tokens_encoder), tokenizer.bos_token_id,
                   str(tokenizer.unk_token or "<unk>"))

    def _disable_dummy_prefix(self) -> None:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2

        proto = model_pb2.ModelProto.FromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp.LoadFromSerializedProto(proto.SerializeToString())

    def __call__(self, text: str, **_: Any) -> dict[str, list[Any]]:
        """Tokenize `text`; offsets are character positions in `text` (None: no position)."""
        ids: list[int] = [] if self.bos_token_id is None else [self.bos_token_id]
        offsets: list[Offset] = [None] * len(ids)
        if not text:
            return {"input_ids": ids, "offset_mapping": offsets}
        shift = 0
        if not self.legacy:  # the slow tokenizer's one "▁" in front of the whole text
            text, shift = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), 1
        pieces = self._tokenize_all(text)
        if (not self.legacy and len(pieces) > 1 and pieces[0][0] == self.sp.piece_to_id(
                SPIECE_UNDERLINE) and pieces[1][2]):
            pieces = pieces[1:]  # "▁" before a leading special token is dropped, as upstream
        for token, offset, _special in pieces:
            ids.append(token)
            offsets.append(None if offset is None else (max(offset[0] - shift, 0),
                                                        max(offset[1] - shift, 0)))
        return {"input_ids": ids, "offset_mapping": offsets}

    def _tokenize_all(self, text: str) -> list[tuple[int, Offset, bool]]:
        out: list[tuple[int, Offset, bool]] = []
        position = 0
        while position < len(text):
            match = self._next_special(text, position)
            end = match[0] if match else len(text)
            if end > position:
                out += [(t, o, False) for t, o in self._tokenize_text(text[position:end],
                                                                      position)]
            if match is None:
                break
            start, token = match
            out.append((self.special[token], (start, start + len(token)), True))
            position = start + len(token)
        return out

    def _next_special(self, text: str, position: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for token in self.special:  # longest first, so ties keep the longest token
            found = text.find(token, position)
            if found != -1 and (best is None or found < best[0]):
                best = (found, token)
        return best

    def _tokenize_text(self, segment: str, origin: int) -> list[tuple[int, Offset]]:
        prefix = ""
        if not self.legacy and segment.startswith((SPIECE_UNDERLINE, " ")):
            prefix = self.unk_token  # upstream's trick to keep a leading "▁" without a dummy one
        proto = self.sp.encode(prefix + segment, out_type="proto")
        pieces = list(proto.pieces)[self.unk_length if prefix else 0:]
        char_of_byte = _byte_to_char(prefix + segment)
        skip = len(prefix)
        return [(p.id, (origin + char_of_byte[p.begin] - skip, origin + char_of_byte[p.end] - skip))
                for p in pieces]


def _byte_to_char(text: str) -> list[int]:
    """Map every UTF-8 byte position of `text` (and its end) to a character position."""
    table: list[int] = []
    for index, char in enumerate(text):
        table += [index] * len(char.encode("utf-8"))
    table.append(len(text))
    return table
