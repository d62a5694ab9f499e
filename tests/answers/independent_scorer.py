"""A second, straightforward scorer, written from the official VQA evaluation's steps and the
answer phrasings the tests draw; `llava evaluate`'s numbers are checked against it."""

from __future__ import annotations

import itertools
import re

PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
         "@", "`", ",", "?", "!"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten"]


def ind_normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(r"(\d)(,)(\d)", text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = re.sub(r"\.(?!\d)", "", out)
    words = []
    for word in out.lower().split():
        if word == "none":
            word = "0"
        elif word in NUMBER_WORDS:
            word = str(NUMBER_WORDS.index(word))
        if word not in ("a", "an", "the"):
            words.append(word)
    return " ".join(words)


def ind_vqa(prediction: str, references: list[str]) -> float:
    """The 10-choose-9 form: every subset leaving one reference out, min(matches / 3, 1)."""
    pred = ind_normalize(prediction)
    refs = [ind_normalize(r) for r in references]
    subsets = list(itertools.combinations(refs, len(refs) - 1))
    return sum(min(sum(r == pred for r in s) / 3, 1) for s in subsets) / len(subsets)


def ind_choice(prediction: str, options: dict[str, str]) -> str | None:
    text = prediction.strip()
    for pattern in (r"\(?([A-Za-z])\)?\.?", r"(?i:the answer is) \(?([A-Z])\)?\.?",
                    r"([a-zA-Z])\) .*"):
        found = re.fullmatch(pattern, text)
        if found and found.group(1).upper() in options:
            return found.group(1).upper()
    named = [k for k, v in options.items() if ind_normalize(v) == ind_normalize(text)]
    return named[0] if len(named) == 1 else None


def ind_score(prediction: str, record: dict) -> float:
    """The score of `prediction` for a drawn record (options / answers / answer layout)."""
    if "options" in record:
        return float(ind_choice(prediction, record["options"]) == record["answer"])
    if "answers" in record:
        return ind_vqa(prediction, record["answers"])
    return float(ind_normalize(prediction) == ind_normalize(record["answer"]))
