"""Rendered text → token ids and labels: the one masking mechanism for every template.

A token is supervised iff its character span ends inside a supervised span of the rendered
text (offset mapping), so labels never depend on per-template length arithmetic — the source
of LLaVA's "tokenization mismatch" that silently zeroed whole samples.

Two tokenization modes:
- `hf`: the whole prompt at once, `<image>` being an added special token — exactly what the
  saved processor does at inference.
- `llava`: the original's: split at `<image>`, tokenize each chunk (BOS kept on the first only),
  join with the image id — for continuing checkpoints trained by the original code.
Each image placeholder then becomes as many image tokens as the vision tower yields.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from llava_cli.sp_original import OriginalSentencePieceTokenizer
from llava_cli.templates import IMAGE_PLACEHOLDER, Rendered

IGNORE_INDEX = -100
TokenizationMode = Literal["hf", "llava"]
TOKENIZATION_MODES = ("hf", "llava")


@dataclass
class Encoded:
    """Token ids and labels of one sample; `image_spans` are [start, end) of each image's run."""

    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]
    truncated: bool = False

    @cached_property
    def n_supervised(self) -> int:
        """How many positions carry a label (the loss is computed over these)."""
        return len(self.labels) - self.labels.count(IGNORE_INDEX)

    @property
    def n_image_tokens(self) -> int:
        """How many positions hold image features."""
        return sum(end - start for start, end in self.image_spans)


Offset = tuple[int, int] | None  # None: a token the tokenizer added (BOS), not from the text


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[Offset]]:
    if isinstance(tokenizer, OriginalSentencePieceTokenizer):
        enc = tokenizer(text)
        return enc["input_ids"], enc["offset_mapping"]
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        # The tokenizers backend directly: same ids as tokenizer(text) (tested), a third of
        # the per-call overhead, which matters when --check scans 665k records.
        encoding = backend.encode(text, add_special_tokens=True)
        offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        offsets[offsets[:, 1] <= offsets[:, 0]] = -1  # HF's (0, 0): a token it added (BOS)
        return encoding.ids, offsets
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError as err:  # slow (pure-Python) tokenizers have no offsets
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives no offset mapping; load a "
                         "fast (tokenizers-backed) tokenizer") from err
    # HF marks tokens it added itself (BOS, EOS) with an empty (0, 0) span.
    offsets = [None if o is None or o[1] <= o[0] else (o[0], o[1])
               for o in enc["offset_mapping"]]
    return list(enc["input_ids"]), offsets


def _tokenize_llava_style(
    tokenizer: Any, text: str, image_id: int
) -> tuple[list[int], list[Offset]]:
    """The original's `tokenizer_image_token`, keeping each token's offsets in `text`.

    `tokenizer` is the HF tokenizer, or for SentencePiece vocabularies the original slow
    tokenization (`sp_original`), so that ids match what the original code produced.
    """
    ids: list[int] = []
    offsets: list[Offset] = []
    start = 0
    bos = tokenizer.bos_token_id
    chunks = text.split(IMAGE_PLACEHOLDER)
    keep_bos = False
    for n, chunk in enumerate(chunks):
        chunk_ids, chunk_offsets = _tokenize(tokenizer, chunk)
        if n == 0:
            keep_bos = bool(chunk_ids) and bos is not None and chunk_ids[0] == bos
        elif keep_bos and chunk_ids and chunk_ids[0] == bos:
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        if n:  # the placeholder that preceded this chunk
            ids.append(image_id)
            offsets.append((start - len(IMAGE_PLACEHOLDER), start))
        ids.extend(chunk_ids)
        offsets.extend(None if o is None else (o[0] + start, o[1] + start)
                       for o in chunk_offsets)
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, offsets


def _offset_array(offsets: Sequence[Offset] | np.ndarray) -> np.ndarray:
    """Offsets as an (n, 2) array; -1 marks a token with no position in the text."""
    if isinstance(offsets, np.ndarray):
        return offsets
    return np.array([(-1, -1) if o is None else o for o in offsets],
                    dtype=np.int64).reshape(-1, 2)


def _labels_from_spans(
    ids: Sequence[int], offsets: Sequence[Offset] | np.ndarray,
    spans: Sequence[tuple[int, int]],
) -> np.ndarray:
    """A token is supervised iff its last character lies in a supervised span.

    Zero-width tokens (SentencePiece's dummy "▁", the first bytes of a byte-fallback
    character) belong to the character at their position. Vectorised: `--check` labels
    hundreds of thousands of records.
    """
    offsets = _offset_array(offsets)
    starts, ends = offsets[:, 0], offsets[:, 1]
    last = np.where(ends > starts, ends, starts + 1)  # one past the owning character
    supervised = np.zeros(len(starts), dtype=bool)
    for span_start, span_end in spans:
        supervised |= (starts >= 0) & (last > span_start) & (last <= span_end)
    return np.where(supervised, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)


def _expand_images(
    ids: Sequence[int], labels: np.ndarray, image_id: int, counts: Sequence[int]
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    ids = np.asarray(ids, dtype=np.int64)
    positions = np.flatnonzero(ids == image_id)
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image token(s) for {len(counts)} "
                         "image(s)")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[positions] = counts
    first = (np.cumsum(repeats) - repeats)[positions]
    labels = labels.copy()
    labels[positions] = IGNORE_INDEX  # image features are never predicted
    spans = [(int(f), int(f) + int(c)) for f, c in zip(first, counts, strict=True)]
    return np.repeat(ids, repeats).tolist(), np.repeat(labels, repeats).tolist(), spans


def _truncate(encoded: Encoded, max_length: int | None) -> Encoded:
    """Cut to `max_length` tokens (image tokens count) without ever splitting an image run."""
    if max_length is None or len(encoded.input_ids) <= max_length:
        return encoded
    cut = max_length
    for start, end in encoded.image_spans:
        if start < cut < end:
            cut = start
    spans = [(s, e) for s, e in encoded.image_spans if e <= cut]
    return Encoded(encoded.input_ids[:cut], encoded.labels[:cut], spans, truncated=True)


class TextEncoder:
    """Tokenizes rendered conversations and labels exactly their supervised spans.

    Built once per dataset: in `llava` mode it prepares the original slow tokenization for
    SentencePiece vocabularies (loading it is far costlier than using it).
    """

    def __init__(self, tokenizer: Any, image_token_id: int, mode: TokenizationMode = "hf",
                 max_length: int | None = None) -> None:
        if mode not in TOKENIZATION_MODES:
            raise ValueError(f"unknown tokenization mode {mode!r}; choose 'hf' or 'llava'")
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.mode = mode
        self.max_length = max_length
        self._original = (OriginalSentencePieceTokenizer.from_hf(tokenizer) or tokenizer
                          if mode == "llava" else None)

    def __call__(self, rendered: Rendered, image_token_counts: Sequence[int]) -> Encoded:
        """Encode `rendered`; image i becomes `image_token_counts[i]` image tokens."""
        if self._original is not None:
            ids, offsets = _tokenize_llava_style(self._original, rendered.text,
                                                 self.image_token_id)
        else:
            ids, offsets = _tokenize(self.tokenizer, rendered.text)
        labels = _labels_from_spans(ids, offsets, rendered.spans)
        ids, labels, spans = _expand_images(ids, labels, self.image_token_id, image_token_counts)
        return _truncate(Encoded(ids, labels, spans), self.max_length)
