"""Scoring answers against references: pure functions, no torch (`llava evaluate` and the demo
share them, so there is one scorer).

Normalisation (`normalize_answer`) follows the official VQA evaluation's answer processing:

1. newlines and tabs become spaces; lower case; surrounding whitespace trimmed;
2. each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted where it touches a space
   (or the text has a digit-comma-digit, "1,000"), and replaced by a space elsewhere
   ("black-and-white" → "black and white");
3. a period not followed by a digit is deleted ("3.5" keeps its point);
4. number words "none" and "zero" … "ten" become digits; the articles "a", "an", "the" are
   dropped; words are re-joined by single spaces.

Not applied: the official table of contractions ("dont" → "don't"); apostrophes and colons are
kept, as the official processing keeps them.

Metrics, each a score in [0, 1] for one record:

- `exact`: 1 when the normalised prediction equals a normalised reference, else 0;
- `vqa`: soft accuracy over several references. The official form (the default) averages,
  over each reference left out in turn, min(#other references equal to the prediction / 3, 1)
  — with 10 references, the average over the 10 subsets of 9; the simple form is
  min(#references equal to the prediction / 3, 1);
- `choice`: the option letter read from the prediction (`extract_choice`) equals the
  reference letter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

METRICS = ("exact", "vqa", "choice")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
                "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")


def normalize_answer(text: str) -> str:
    """`text` in the comparable form of the VQA evaluation (steps in the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    given = text  # the official check reads the text as given, not as it is being rewritten
    touching = bool(_DIGIT_COMMA.search(given))
    for mark in _PUNCTUATION:
        glued = touching or f"{mark} " in given or f" {mark}" in given
        text = text.replace(mark, "" if glued else " ")
    text = _PERIOD.sub("", text)
    words = [_NUMBERS.get(word, word) for word in text.split()]
    return " ".join(word for word in words if word not in _ARTICLES)


def first_word(text: str) -> str:
    """The first whitespace-separated word of `text` ("" for none): the demo's one-word
    answers are scored on it, so a model that adds words after a right answer still scores."""
    words = text.split()
    return words[0] if words else ""


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0."""
    answer = normalize_answer(prediction)
    return float(any(answer == normalize_answer(ref) for ref in references))


def vqa_accuracy(prediction: str, references: Sequence[str], official: bool = True) -> float:
    """VQA soft accuracy of `prediction` (see the module docstring for both forms)."""
    if not references:
        return 0.0
    answer = normalize_answer(prediction)
    matches = [normalize_answer(ref) == answer for ref in references]
    if not official:
        return min(sum(matches) / 3, 1.0)
    # Leave each reference out in turn; the others vote (the official evaluation's loop).
    total = sum(matches)
    return sum(min((total - left_out) / 3, 1.0) for left_out in matches) / len(matches)


# ---- multiple choice ----------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_KEYWORD = re.compile(r"(?:answer|option|choice)(?:\s+is)?[\s:]*\(?([A-Za-z])\)?(?![A-Za-z])",
                      re.IGNORECASE)
_LEADING = re.compile(r"^\s*\(?([A-Za-z])(?:[).:]|\s*$)")
_BARE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")


def record_options(record: Mapping[str, object]) -> dict[str, str]:
    """The options of a multiple-choice record, letter → text ({} when it has none).

    Accepted layouts: `options` (or `choices`) as a mapping {"A": "cat", ...}, as a list
    (lettered A, B, … in order) or as text with one lettered option a line ("A. cat\nB. dog";
    "A)" and "(A)" too), or top-level fields "A", "B", … (MMBench's columns; empty, null or
    NaN ones are left out, as MMBench's questions have two to four options). Anything else
    (text that is not lettered lines, a number, an option that is a list or mapping) is a
    ValueError naming the field: ignored options would score a choice question as free text.
    """
    key = "options" if "options" in record else "choices"
    given = record.get(key)
    if isinstance(given, Mapping):
        pairs = [(str(k).strip().upper(), v) for k, v in given.items()]
    elif isinstance(given, list):
        pairs = list(zip(_LETTERS, given, strict=False))
    elif isinstance(given, str):
        pairs = _lettered_lines(given, key)
    elif given is not None:
        raise ValueError(f"`{key}` is {type(given).__name__}; give a list of options, a "
                         "mapping {\"A\": ..., \"B\": ...} or one \"A. text\" line per option")
    else:
        pairs = [(letter, record.get(letter)) for letter in _LETTERS if letter in record]
    for letter, value in pairs:
        if isinstance(value, (Mapping, list)):
            raise ValueError(f"option {letter} of `{key}` is a {type(value).__name__}; "
                             "each option must be text")
    return {k: str(v).strip() for k, v in pairs if _present(v)}


_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*?)\s*$")


def _lettered_lines(text: str, key: str) -> list[tuple[str, str]]:
    """The options of a text `options` field: one "A. cat" line each (blank lines skipped)."""
    lines = [line for line in text.splitlines() if line.strip()]
    found = [_OPTION_LINE.match(line) for line in lines]
    if not all(found):  # no lines (empty text): no options
        bad = next((line for line, m in zip(lines, found, strict=True) if not m), text)
        raise ValueError(f"`{key}` is text, but {bad.strip()!r} is not a lettered option "
                         "line; give one \"A. text\" line per option, or a list of options")
    return [(m.group(1), m.group(2)) for m in found if m]


def _present(value: object) -> bool:
    if value is None or (isinstance(value, float) and value != value):  # NaN from a TSV
        return False
    return bool(str(value).strip())


def reference_letter(reference: str, options: Mapping[str, str]) -> str | None:
    """The option letter a reference names: a letter ("B", "(B)", "b.") or an option's text."""
    return extract_choice(reference, options)


def extract_choice(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter `prediction` gives, or None when it names none (or several).

    Tried in order: the whole answer is a letter ("B", "(b)", "B."); a phrase "answer is B",
    "answer: B", "option B", "choice (B)"; a leading letter with a delimiter ("b) cat",
    "C: dog"); exactly one capital option letter standing alone ("I think B") — a capital "A"
    followed by a lower-case word is read as the article ("A cat sits"); finally the option
    texts: the normalised answer equals one, or contains exactly one as whole words.
    """
    letters = set(options)
    bare = prediction.strip().strip(".:)(").strip()
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    for pattern in (_KEYWORD, _LEADING):
        found = pattern.search(prediction)
        if found and found.group(1).upper() in letters:
            return found.group(1).upper()
    standing = {m.group(1) for m in _BARE.finditer(prediction)
                if m.group(1) in letters and not _is_article(prediction, m)}
    if len(standing) == 1:
        return standing.pop()
    if standing:
        return None  # several letters: no one answer
    return _by_text(prediction, options)


def _is_article(text: str, match: re.Match[str]) -> bool:
    return match.group(1) == "A" and re.match(r"\s+[a-z]", text[match.end():]) is not None


def _by_text(prediction: str, options: Mapping[str, str]) -> str | None:
    answer = normalize_answer(prediction)
    texts = {letter: normalize_answer(text) for letter, text in options.items()}
    equal = [letter for letter, text in texts.items() if text and text == answer]
    if len(equal) == 1:
        return equal[0]
    inside = [letter for letter, text in texts.items()
              if text and re.search(rf"(?<!\S){re.escape(text)}(?!\S)", answer)]
    return inside[0] if len(inside) == 1 else None


def choice_score(prediction: str, reference: str, options: Mapping[str, str]) -> float:
    """1.0 when the letter read from `prediction` is the letter `reference` names."""
    want = reference_letter(reference, options)
    return float(want is not None and extract_choice(prediction, options) == want)


# ---- one record, and many ------------------------------------------------------------------

def metric_for(references: Sequence[str], options: Mapping[str, str],
               override: str | None = None) -> str:
    """The metric a record is scored with: `override` when given, else `choice` with options,
    `vqa` with several references, `exact` otherwise."""
    if override is not None:
        if override not in METRICS:
            raise ValueError(f"unknown metric {override!r}; one of {', '.join(METRICS)}")
        return override
    if options:
        return "choice"
    return "vqa" if len(references) > 1 else "exact"


def score_answer(prediction: str, references: Sequence[str], metric: str,
                 options: Mapping[str, str] | None = None, official_vqa: bool = True) -> float:
    """The score in [0, 1] of `prediction` against `references` by `metric`."""
    if metric == "exact":
        return exact_match(prediction, references)
    if metric == "vqa":
        return vqa_accuracy(prediction, references, official_vqa)
    if metric == "choice":
        if not options:
            raise ValueError("the choice metric needs the record's options")
        return choice_score(prediction, references[0], options) if references else 0.0
    raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


@dataclass
class Tally:
    """Scores summed overall and per group; accuracy is the mean score."""

    total: float = 0.0
    n: int = 0
    groups: dict[str, list[float]] = field(default_factory=dict)  # group → [score sum, count]

    def add(self, score: float, group: str | None = None) -> None:
        """Count one record's score (in `group`, when grouping)."""
        self.total += score
        self.n += 1
        if group is not None:
            sums = self.groups.setdefault(group, [0.0, 0])
            sums[0] += score
            sums[1] += 1

    def accuracy(self) -> float:
        """The mean score of every record (0.0 for none)."""
        return self.total / self.n if self.n else 0.0

    def group_accuracy(self) -> dict[str, dict[str, float | int]]:
        """Per group: its accuracy and record count, in the order groups were first seen."""
        return {g: {"accuracy": s / c if c else 0.0, "n": int(c)}
                for g, (s, c) in self.groups.items()}


def tally(scores: Iterable[tuple[float, str | None]]) -> Tally:
    """A `Tally` of (score, group) pairs."""
    result = Tally()
    for score, group in scores:
        result.add(score, group)
    return result
