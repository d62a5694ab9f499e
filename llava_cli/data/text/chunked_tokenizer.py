"""Exact, faster tokenization for SentencePiece-style BPE vocabularies (Llama, Vicuna, Mistral).

transformers 5 gives these tokenizers a `Metaspace(split=False)` pre-tokenizer: all the text
between two special tokens is ONE word for the BPE model, so the library's word cache never
hits, and each record pays for BPE over ~1,400 characters plus turning every id and offset
into Python objects. That was 60% of `inspect-data --check`.

The text can be cut into chunks that BPE provably never merges across: before every run of
spaces that follows a non-space character. A token spanning such a cut would contain the
space symbol "▁" right after another character; `ChunkedEncoder.for_tokenizer` accepts a
vocabulary only when none of its tokens does (Llama/Mistral: none). Merges only ever form
vocabulary tokens, so BPE of the whole piece equals BPE of each chunk, concatenated: the ids
and offsets are the library's own, computed by the library once per distinct chunk. Everything
else the library does (special-token splitting, the prepended "▁", BOS) is reproduced here
only for the configurations checked below; any other tokenizer gets `None` (the plain path),
and a probe battery compares both paths before the fast one is used.
"""

from __future__ import annotations

import re
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np

SPACE_SYMBOL = "▁"
CACHE_LIMIT = 1 << 16  # chunks kept per process (≤ ~27 MB measured); cleared when full
# Texts that exercise every rule below; both paths must agree on all of them.
PROBES = (
    "", " ", "a", "  lead", "trail  ", "a  b   c", "<image>\nWhat is it?", "x<image>y",
    "<s>hi</s>", "USER: <image>\nQ? ASSISTANT: A</s>USER: B ASSISTANT:  C </s>",
    "tab\tand\nnew\n\nlines", "▁literal ▁▁symbol", "émoji 🦙 and 漢字 😀😀", "  <image>  ",
)


# A chunk's ids, their owner ends relative to the chunk, how many tokens, how many characters.
Entry = tuple[list[int], list[int], int, int]


class ChunkedEncoder:
    """`encode(text)` → the backend's ids for `text` and each token's owner end, faster.

    A token's owner end is one past the last character it covers, -1 for a token with no
    text of its own (BOS): all that labelling needs (`encoding._labels_from_spans`). Built for
    one state of the tokenizer: `is_current()` turns False once tokens are added to it.
    """

    def __init__(self, backend: Any, never_prepend: Any, prepend_scheme: str,
                 added: dict[str, int], prefix: list[int], suffix: list[int]) -> None:
        self.backend = backend  # the original: encodes chunks that get the prepended "▁"
        self.never_prepend = never_prepend  # a copy that never prepends "▁"
        self.prepend_scheme = prepend_scheme
        self.added = added
        # Leftmost-longest, like the library's matcher: longer alternatives first.
        pattern = "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True))
        self.added_pattern = re.compile(f"({pattern})") if added else None
        self.prefix, self.suffix = prefix, suffix
        self.prefix_ends = np.full(len(prefix), -1, dtype=np.int64)
        self.suffix_ends = np.full(len(suffix), -1, dtype=np.int64)
        self.added_entries = {content: ([token_id], [len(content)], 1, len(content))
                              for content, token_id in added.items()}
        # chunk text → entry; word → entry of " " + word (the common chunk, no string built);
        # chunk text → entry with "▁" prepended (the first chunk of a text).
        self.plain: dict[str, Entry] = {}
        self.spaced: dict[str, Entry] = {}
        self.prepended: dict[str, Entry] = {}
        self._caches = (self.plain, self.spaced, self.prepended)
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> ChunkedEncoder | None:
        """The fast encoder for a HF fast tokenizer, or None when exactness is not proven."""
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None or not _pipeline_is_supported(backend):
            return None
        from tokenizers import Tokenizer, pre_tokenizers

        never_prepend = Tokenizer.from_str(backend.to_str())
        never_prepend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE_SYMBOL, prepend_scheme="never", split=False)
        added = {token.content: token_id
                 for token_id, token in backend.get_added_tokens_decoder().items()}
        prefix, suffix = _post_processor_frame(backend)
        encoder = cls(backend, never_prepend, backend.pre_tokenizer.prepend_scheme, added,
                      prefix, suffix)
        return encoder if all(encoder.agrees(probe) for probe in PROBES) else None

    def is_current(self) -> bool:
        """False once the tokenizer gained tokens after this encoder was built."""
        return self.backend.get_vocab_size(with_added_tokens=True) == self._vocab_size

    def reference(self, text: str) -> tuple[list[int], np.ndarray]:
        """What the library itself gives for `text` (ids, owner ends): the slow, sure path."""
        encoding = self.backend.encode(text, add_special_tokens=True)
        return encoding.ids, owner_ends(encoding.offsets)

    def checked(self, text: str) -> tuple[list[int], np.ndarray, bool]:
        """The library's ids and owner ends for `text`, and whether `encode` gives the same."""
        ids, ends = self.encode(text)
        expected_ids, expected_ends = self.reference(text)
        same = ids == expected_ids and np.array_equal(ends, expected_ends)
        return expected_ids, expected_ends, same

    def agrees(self, text: str) -> bool:
        """True when this encoder gives exactly the library's ids and owner ends for `text`."""
        return self.checked(text)[2]

    def encode(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids and owner ends of `text`, special tokens added."""
        if sum(map(len, self._caches)) >= CACHE_LIMIT:  # checked per text: may overshoot by one
            for cache in self._caches:
                cache.clear()
        entries: list[Entry] = []
        pieces = self.added_pattern.split(text) if self.added_pattern else [text]
        # re.split with one group alternates: plain text, added token, plain text, ...
        for n, piece in enumerate(pieces):
            if n % 2:
                entries.append(self.added_entries[piece])
            elif piece:
                self._add_piece(piece, n == 0, entries)
        # Entries tile the text in order, so each one starts where the previous ones end.
        counts = np.fromiter(map(_TOKENS, entries), np.int64, len(entries))
        chars = np.fromiter(map(_CHARS, entries), np.int64, len(entries))
        ends = np.fromiter(chain.from_iterable(map(_ENDS, entries)), np.int64, counts.sum())
        shift = np.repeat(np.cumsum(chars) - chars, counts)
        ends = np.concatenate([self.prefix_ends, np.where(ends >= 0, ends + shift, -1),
                               self.suffix_ends])
        return [*self.prefix, *chain.from_iterable(map(_IDS, entries)), *self.suffix], ends

    def _add_piece(self, piece: str, at_text_start: bool, entries: list[Entry]) -> None:
        """Entries of one text piece between special tokens, chunk by chunk."""
        if "  " in piece or SPACE_SYMBOL in piece:  # rare: space runs, a literal "▁"
            first, *rest = _CHUNK.findall(piece)
            cache = self.plain
        else:  # one space between words: chunk i > 0 is " " + word i, cached by the word
            first, *rest = piece.split(" ")
            cache = self.spaced
        rest_entries = list(map(cache.get, rest))  # the hot loop, at C speed
        if not all(rest_entries):  # entries are non-empty tuples; misses are None
            for n, entry in enumerate(rest_entries):
                if entry is None:
                    chunk = rest[n] if cache is self.plain else " " + rest[n]
                    rest_entries[n] = self._entry(chunk, cache, rest[n])
        if first:  # "▁" is prepended only to a chunk that does not start with a space
            prepends = self.prepend_scheme == "always" or (
                self.prepend_scheme == "first" and at_text_start)
            if first.startswith((" ", SPACE_SYMBOL)):
                prepends = False
            cache = self.prepended if prepends else self.plain
            entries.append(cache.get(first) or self._entry(first, cache, first))
        entries += rest_entries

    def _entry(self, chunk: str, cache: dict[str, Entry], key: str) -> Entry:
        """Encode one chunk with the library and remember it."""
        backend = self.backend if cache is self.prepended else self.never_prepend
        encoding = backend.encode(chunk, add_special_tokens=False)
        entry = (encoding.ids, owner_ends(encoding.offsets).tolist(), len(encoding.ids),
                 len(chunk))
        cache[key] = entry
        return entry


_IDS, _ENDS, _TOKENS, _CHARS = (itemgetter(n) for n in range(4))


def owner_ends(offsets: Any) -> np.ndarray:
    """One past the last character of each token; -1 for a token with no text of its own.

    HF gives tokens it added (BOS) an empty (0, 0) span; like `encoding._tokenize`, every
    empty span counts as no text (never supervised).
    """
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return np.where(spans[:, 1] > spans[:, 0], spans[:, 1], -1)


# A chunk: an optional run of spaces, then everything up to the next space.
_CHUNK = re.compile(f"[ {SPACE_SYMBOL}]*[^ {SPACE_SYMBOL}]+|[ {SPACE_SYMBOL}]+")


def _pipeline_is_supported(backend: Any) -> bool:
    """The library pipeline this module reproduces: no normalizer, Metaspace without
    splitting, plain BPE, special tokens split out as they are, no vocabulary token that
    spans a chunk cut."""
    from tokenizers import models, pre_tokenizers

    pre = backend.pre_tokenizer
    if backend.normalizer is not None or not isinstance(pre, pre_tokenizers.Metaspace):
        return False
    if pre.split or pre.replacement != SPACE_SYMBOL or pre.prepend_scheme not in (
            "first", "always", "never"):
        return False
    model = backend.model
    if not isinstance(model, models.BPE) or model.dropout or model.ignore_merges or \
            model.continuing_subword_prefix or model.end_of_word_suffix:
        return False  # ignore_merges: a whole chunk found in the vocabulary skips BPE
    if backend.encode_special_tokens:
        return False
    added = backend.get_added_tokens_decoder().values()
    if any(t.lstrip or t.rstrip or t.single_word or t.normalized for t in added):
        return False
    # A token with "▁" right after another character would span a cut.
    spans_a_cut = re.compile(f"[^{SPACE_SYMBOL}]{SPACE_SYMBOL}").search
    return not any(map(spans_a_cut, backend.get_vocab()))


def _post_processor_frame(backend: Any) -> tuple[list[int], list[int]]:
    """The ids the post-processor puts before and after a text (Llama: BOS before)."""
    plain = backend.encode("a", add_special_tokens=False).ids
    framed = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    raise ValueError("cannot find the text inside the post-processed encoding")
