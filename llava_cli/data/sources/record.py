"""A record read from a mix source: a dict (what every record reader expects) that also
carries, as attributes a JSON record cannot set, where it came from, its source's image folder
and its embedded image bytes."""

from __future__ import annotations

from typing import Any


class SourceRecord(dict):
    """A LLaVA record plus its provenance. `json.loads` only ever makes plain dicts, so a
    record's text cannot claim another image folder or inject image bytes: only a source
    reader builds a `SourceRecord`."""

    def __init__(self, record: dict[str, Any], *, origin: str | None = None,
                 image_folder: str | None = None,
                 embedded: dict[str, bytes] | None = None) -> None:
        super().__init__(record)
        self.origin = origin  # "source#local position": names the record when it has no id
        self.image_folder = image_folder  # None: the run's image_folder applies
        self.embedded = embedded or {}  # image name in the record → the image file's bytes

    def __reduce__(self) -> Any:
        # dict subclasses pickle their items but not always their attributes: keep both.
        return (_rebuild, (dict(self), self.origin, self.image_folder, self.embedded))


def _rebuild(record: dict[str, Any], origin: str | None, image_folder: str | None,
             embedded: dict[str, bytes]) -> SourceRecord:
    return SourceRecord(record, origin=origin, image_folder=image_folder, embedded=embedded)
