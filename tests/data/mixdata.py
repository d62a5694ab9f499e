"""Tiny real data sources for the mix tests, written in the test's own folder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def turns(user: str, reply: str) -> list[dict[str, str]]:
    """A one-round LLaVA conversation."""
    return [{"from": "human", "value": user}, {"from": "gpt", "value": reply}]


def records(prefix: str, n: int, image: str | None = None) -> list[dict]:
    """`n` records with ids `prefix-0`…; with `image`, each record shows that image."""
    out = []
    for k in range(n):
        record = {"id": f"{prefix}-{k}", "conversations": turns(
            ("<image>\n" if image else "") + f"question {k}", f"answer {k}")}
        if image:
            record["image"] = image
        out.append(record)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """JSON Lines, one record a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    """A JSON array of records."""
    path.write_text(json.dumps(rows, indent=1))
    return path


def png_bytes(size: tuple[int, int] = (20, 12), colour=(200, 30, 40)) -> bytes:
    """A real non-square PNG."""
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict, bytes | None]]) -> Path:
    """A WebDataset shard: KEY.json and, when given, KEY.png per sample."""
    with tarfile.open(path, "w") as tar:
        for key, record, image in samples:
            for name, data in ((f"{key}.json", json.dumps(record).encode()),
                               (f"{key}.png", image)):
                if data is None:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
