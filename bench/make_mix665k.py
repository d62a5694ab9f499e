"""Write a synthetic file shaped like LLaVA's ``llava_v1_5_mix665k.json``.

The real file is a compact ``json.dump`` (no indent, ASCII escapes) of 665,298 records,
about 1.03 GB. This script reproduces its shape closely enough to benchmark loaders:

* ~6% text-only records (ShareGPT-like: long, multi-turn, no ``"image"`` key, some
  unicode, code with braces and brackets, escaped quotes and backslashes);
* image records from the mix's sources (COCO instruct, VQAv2, GQA, OCR-VQA, TextVQA,
  Visual Genome, RefCOCO) with the source's image path layout, ``<image>\\n`` in the first
  human turn, and the source's typical number and length of turns.

It streams records to disk one at a time, so memory stays flat, and draws text from a
pre-built pool of sentences so that ~1 GB takes well under two minutes.

Usage: ``python bench/make_mix665k.py OUT.json [--records 665298] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections.abc import Callable

# A small vocabulary: the text only needs realistic sizes, not meaning.
WORDS = [
    "the", "a", "of", "and", "to", "in", "is", "on", "with", "for", "at", "by", "from",
    "this", "that", "what", "which", "there", "are", "was", "image", "picture", "photo",
    "man", "woman", "person", "people", "dog", "cat", "bus", "car", "train", "street",
    "table", "room", "white", "black", "red", "blue", "green", "yellow", "brown", "small",
    "large", "left", "right", "front", "behind", "near", "standing", "sitting", "holding",
    "wearing", "looking", "walking", "riding", "playing", "eating", "parked", "building",
    "sign", "window", "tree", "grass", "sky", "water", "field", "road", "plate", "food",
    "kitchen", "bathroom", "describe", "detail", "scene", "object", "color", "number",
    "shape", "located", "background", "foreground", "because", "however", "therefore",
    "several", "many", "some", "each", "other", "while", "during", "between", "model",
    "data", "function", "value", "result", "question", "answer", "explain", "example",
    "code", "python", "use", "using", "used", "make", "makes", "made", "provide",
    "provides", "information", "important", "different",
]
UNICODE = [
    "café", "naïve", "Straße", "日本語のテキスト", "中文句子", "한국어", "😀", "🚀🔥", "Ω≈ç√",
]
CODE = [
    'def f(x):\n    return {"a": [x, x * 2]}\n',
    'print("he said \\"hi\\"")\n',
    "path = 'C:\\\\Users\\\\data\\\\'\n",
    'if (a[i] > b[j]) { return "}"; }\n',
    'The key "image" is not set here.',
]
QUESTIONS = [
    "What is the color of the {}?",
    "How many {} are there?",
    "Is the {} on the left or right?",
    "What is the {} doing?",
    "Where is the {} located?",
]
SHORT_HINT = "\nAnswer the question using a single word or phrase."


class TextPool:
    """Pre-built random sentences, so generating 1 GB costs little Python per record."""

    def __init__(self, rng: random.Random, size: int = 20000) -> None:
        self.rng = rng
        self.sentences = [self._sentence() for _ in range(size)]

    def _sentence(self) -> str:
        words = self.rng.choices(WORDS, k=self.rng.randint(6, 24))
        return " ".join(words).capitalize() + "."

    def text(self, n_sentences: int) -> str:
        """Return ``n_sentences`` random sentences joined by spaces."""
        return " ".join(self.rng.choices(self.sentences, k=max(1, n_sentences)))


def _turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    conv: list[dict[str, str]] = []
    for q, a in pairs:
        conv.append({"from": "human", "value": q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _with_image(conv: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    # LLaVA puts the image token at the start (or, rarely, the end) of the first turn.
    first = conv[0]["value"]
    conv[0]["value"] = f"<image>\n{first}" if rng.random() < 0.9 else f"{first}\n<image>"
    return conv


def coco_instruct(rng: random.Random, pool: TextPool, i: int) -> dict:
    """LLaVA-Instruct-158k: few turns, long answers."""
    n = rng.choice([1, 1, 1, 2, 3, 4, 5])
    pairs = [(pool.text(rng.randint(1, 2)), pool.text(rng.randint(2, 10))) for _ in range(n)]
    img = f"{rng.randint(1, 581929):012d}"
    return {"id": img, "image": f"coco/train2017/{img}.jpg",
            "conversations": _with_image(_turns(pairs), rng)}


def short_vqa(prefix: str, id_fmt: Callable[[int], str], hint: str = SHORT_HINT):
    """VQAv2/GQA/OCR-VQA style: many short question/answer turns about one image."""

    def make(rng: random.Random, pool: TextPool, i: int) -> dict:
        n = rng.randint(2, 11)
        pairs = []
        for _ in range(n):
            q = rng.choice(QUESTIONS).format(rng.choice(WORDS)) + hint
            pairs.append((q, " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))))
        ident = id_fmt(rng.randint(1, 2_400_000))
        return {"id": ident, "image": f"{prefix}{ident}.jpg",
                "conversations": _with_image(_turns(pairs), rng)}

    return make


def refcoco(rng: random.Random, pool: TextPool, i: int) -> dict:
    """RefCOCO / Visual Genome: region descriptions with box coordinates."""
    pairs = []
    for _ in range(rng.randint(2, 9)):
        box = [round(rng.random(), 2) for _ in range(4)]
        q = f"Please provide a short description for this region: {box}"
        pairs.append((q, pool.text(1)))
    img = f"{rng.randint(1, 2_417_000)}"
    return {"id": f"VG_{img}", "image": f"vg/VG_100K/{img}.jpg",
            "conversations": _with_image(_turns(pairs), rng)}


def sharegpt(rng: random.Random, pool: TextPool, i: int) -> dict:
    """ShareGPT: text-only, long multi-turn, unicode and code."""
    pairs = []
    for _ in range(rng.randint(1, 5)):
        q = pool.text(rng.randint(1, 4))
        a = pool.text(rng.randint(3, 18))
        if rng.random() < 0.3:
            a += " " + rng.choice(UNICODE)
        if rng.random() < 0.3:
            a += "\n```\n" + rng.choice(CODE) + "```"
        pairs.append((q, a))
    ident = "".join(rng.choices(string.ascii_letters + string.digits, k=7))
    return {"id": f"{ident}_{rng.randint(0, 9)}", "model": "", "conversations": _turns(pairs)}


# (weight, generator) roughly following the mix's composition.
SOURCES: list[tuple[float, Callable[[random.Random, TextPool, int], dict]]] = [
    (0.238, coco_instruct),
    (0.125, short_vqa("coco/train2017/", lambda n: f"{n:012d}")),
    (0.108, short_vqa("gqa/images/", str)),
    (0.120, short_vqa("ocr_vqa/images/", lambda n: f"{n:010d}")),
    (0.033, short_vqa("textvqa/train_images/", lambda n: f"{n:016x}", "")),
    (0.099, short_vqa("coco/train2017/", lambda n: f"{n:012d}", "\nA. yes\nB. no")),
    (0.217, refcoco),
    (0.060, sharegpt),
]


def generate(out: str, records: int, seed: int) -> int:
    """Stream ``records`` synthetic records to ``out`` as one compact JSON array."""
    rng = random.Random(seed)
    pool = TextPool(rng)
    weights = [w for w, _ in SOURCES]
    makers = [m for _, m in SOURCES]
    choice = rng.choices(range(len(makers)), weights=weights, k=records)
    written = 0
    with open(out, "w", encoding="ascii") as f:
        f.write("[")
        for i, k in enumerate(choice):
            # Compact json.dump style: ", " between records and ": " after keys.
            chunk = (", " if i else "") + json.dumps(makers[k](rng, pool, i))
            written += f.write(chunk)
        f.write("]")
    return written + 2


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--records", type=int, default=665298)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    size = generate(args.out, args.records, args.seed)
    dt = time.perf_counter() - t0
    print(f"wrote {args.records} records, {size / 1e9:.3f} GB to {args.out} in {dt:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
