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

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any, Literal

import numpy as np

from llava_cli.data.text.chunked_tokenizer import ChunkedEncoder, owner_ends
from llava_cli.data.text.sp_original import OriginalSentencePieceTokenizer
from llava_cli.data.text.templates import IMAGE_PLACEHOLDER, Rendered

IGNORE_INDEX = -100
TokenizationMode = Literal["hf", "llava"]
TOKENIZATION_MODES = ("hf", "llava")


@dataclass
class Encoded:
    """Token ids and labels of one sample; `image_spans` are [start, end) of each image's run.

    Held as arrays (the collator and `--check` never need Python lists); `input_ids` and
    `labels` give lists for display and scripts.
    """

    ids: np.ndarray
    label_ids: np.ndarray
    image_spans: list[tuple[int, int]]
    truncated: bool = False

    @cached_property
    def input_ids(self) -> list[int]:
        """The token ids as a list."""
        return self.ids.tolist()

    @cached_property
    def labels(self) -> list[int]:
        """The labels as a list (`IGNORE_INDEX` where nothing is predicted)."""
        return self.label_ids.tolist()

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def n_supervised(self) -> int:
        """How many positions carry a label (the loss is computed over these)."""
        return int(np.count_nonzero(self.label_ids != IGNORE_INDEX))

    @property
    def n_image_tokens(self) -> int:
        """How many positions hold image features."""
        return sum(end - start for start, end in self.image_spans)


Offset = tuple[int, int] | None  # None: a token the tokenizer added (BOS), not from the text
VERIFY_EVERY = 101  # the fast tokenization path re-checks one record in this many


def _ends_from_offsets(offsets: Sequence[Offset]) -> np.ndarray:
    """One past the character that owns each token; -1 for a token with no text (BOS).

    Zero-width tokens (SentencePiece's dummy "▁", the first bytes of a byte-fallback
    character) belong to the character at their position.
    """
    pairs = np.array([(-1, -1) if o is None else o for o in offsets],
                     dtype=np.int64).reshape(-1, 2)
    starts, ends = pairs[:, 0], pairs[:, 1]
    return np.where(starts < 0, -1, np.where(ends > starts, ends, starts + 1))


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    """Ids of `text` (special tokens added) and each token's owner end (see above)."""
    if isinstance(tokenizer, OriginalSentencePieceTokenizer):
        enc = tokenizer(text)
        return enc["input_ids"], _ends_from_offsets(enc["offset_mapping"])
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        # The tokenizers backend directly: same ids as tokenizer(text) (tested), a third of
        # the per-call overhead.
        encoding = backend.encode(text, add_special_tokens=True)
        return encoding.ids, owner_ends(encoding.offsets)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except NotImplementedError as err:  # slow (pure-Python) tokenizers have no offsets
        raise ValueError(f"tokenizer {type(tokenizer).__name__} gives no offset mapping; load a "
                         "fast (tokenizers-backed) tokenizer") from err
    # HF marks tokens it added itself (BOS, EOS) with an empty (0, 0) span.
    offsets = [None if o is None or o[1] <= o[0] else (o[0], o[1])
               for o in enc["offset_mapping"]]
    return list(enc["input_ids"]), _ends_from_offsets(offsets)


def _tokenize_llava_style(tokenizer: Any, text: str, image_id: int) -> tuple[list[int], np.ndarray]:
    """The original's `tokenizer_image_token`, keeping each token's owner end in `text`.

    `tokenizer` is the HF tokenizer, or for SentencePiece vocabularies the original slow
    tokenization (`sp_original`), so that ids match what the original code produced.
    """
    ids: list[int] = []
    ends: list[np.ndarray] = []
    start = 0
    bos = tokenizer.bos_token_id
    chunks = text.split(IMAGE_PLACEHOLDER)
    keep_bos = False
    for n, chunk in enumerate(chunks):
        chunk_ids, chunk_ends = _tokenize(tokenizer, chunk)
        if n == 0:
            keep_bos = bool(chunk_ids) and bos is not None and chunk_ids[0] == bos
        elif keep_bos and chunk_ids and chunk_ids[0] == bos:
            chunk_ids, chunk_ends = chunk_ids[1:], chunk_ends[1:]
        if n:  # the placeholder that preceded this chunk
            ids.append(image_id)
            ends.append(np.array([start], dtype=np.int64))
        ids.extend(chunk_ids)
        ends.append(np.where(chunk_ends >= 0, chunk_ends + start, -1))
        start += len(chunk) + len(IMAGE_PLACEHOLDER)
    return ids, np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)


def _labels_from_spans(ids: Sequence[int], ends: np.ndarray,
                       spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """A token is supervised iff the character that owns it lies in a supervised span.

    Vectorised over tokens and spans (`--check` labels hundreds of thousands of records):
    for each token, the last span starting before its owner end is the only candidate.
    """
    ordered = sorted(spans)
    if any(a[1] > b[0] for a, b in pairwise(ordered)):  # overlapping: merge them
        ordered = _merged(ordered)
    starts = np.array([s for s, _ in ordered], dtype=np.int64)
    stops = np.array([e for _, e in ordered] or [0], dtype=np.int64)
    candidate = np.searchsorted(starts, ends, side="left") - 1  # last span with start < end
    supervised = (candidate >= 0) & (ends <= stops[np.maximum(candidate, 0)])
    return np.where(supervised, np.asarray(ids, dtype=np.int64), IGNORE_INDEX)


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = [spans[0]]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _expand_images(ids: np.ndarray, labels: np.ndarray, image_id: int,
                   counts: Sequence[int]) -> Encoded:
    """Each image placeholder becomes `counts[i]` image tokens, never supervised."""
    positions = np.flatnonzero(ids == image_id).tolist()
    if len(positions) != len(counts):
        raise ValueError(f"the prompt has {len(positions)} image token(s) for {len(counts)} "
                         "image(s)")
    if not positions:
        return Encoded(ids, labels, [])
    # Text runs and image runs, alternating: one concatenate per array (records have few images).
    id_runs, label_runs, spans = [], [], []
    previous, grown = 0, 0
    for position, count in zip(positions, counts, strict=True):
        id_runs += [ids[previous:position], np.full(count, image_id, dtype=np.int64)]
        label_runs += [labels[previous:position], np.full(count, IGNORE_INDEX, dtype=np.int64)]
        start = position + grown
        spans.append((start, start + count))
        grown += count - 1
        previous = position + 1
    id_runs.append(ids[previous:])
    label_runs.append(labels[previous:])
    return Encoded(np.concatenate(id_runs), np.concatenate(label_runs), spans)


def _truncate(encoded: Encoded, max_length: int | None) -> Encoded:
    """Cut to `max_length` tokens (image tokens count) without ever splitting an image run."""
    if max_length is None or len(encoded) <= max_length:
        return encoded
    cut = max_length
    for start, end in encoded.image_spans:
        if start < cut < end:
            cut = start
    spans = [(s, e) for s, e in encoded.image_spans if e <= cut]
    return Encoded(encoded.ids[:cut], encoded.label_ids[:cut], spans, truncated=True)


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
        self._chunked = ChunkedEncoder.for_tokenizer(tokenizer) if mode == "hf" else None
        self._calls = 0

    def _tokenize_hf(self, text: str) -> tuple[list[int], np.ndarray]:
        """The whole prompt at once; through the chunk cache when the tokenizer allows it."""
        if self._chunked is not None and not self._chunked.is_current():
            self._chunked = ChunkedEncoder.for_tokenizer(self.tokenizer)  # tokens were added
        if self._chunked is None:
            return _tokenize(self.tokenizer, text)
        self._calls += 1
        if self._calls % VERIFY_EVERY:
            return self._chunked.encode(text)
        # A standing spot check against the library: the equality is proven and tested, but
        # a tokenizer this code has never met must not be able to change labels silently.
        ids, ends, same = self._chunked.checked(text)
        if not same:
            warnings.warn("the cached tokenization disagreed with the tokenizer on one text; "
                          "using the tokenizer directly from now on (please report this)",
                          RuntimeWarning, stacklevel=2)
            self._chunked = None
        return ids, ends

    def __call__(self, rendered: Rendered, image_token_counts: Sequence[int]) -> Encoded:
        """Encode `rendered`; image i becomes `image_token_counts[i]` image tokens."""
        if self._original is not None:
            ids, ends = _tokenize_llava_style(self._original, rendered.text,
                                              self.image_token_id)
        else:
            ids, ends = self._tokenize_hf(rendered.text)
        id_array = np.asarray(ids, dtype=np.int64)  # once, for labelling and image expansion
        labels = _labels_from_spans(id_array, ends, rendered.spans)
        encoded = _expand_images(id_array, labels, self.image_token_id, image_token_counts)
        return _truncate(encoded, self.max_length)
