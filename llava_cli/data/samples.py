"""One record → one training sample: parse, render, tokenize, label, load images.

`SampleBuilder` is the data path shared by `inspect-data` and every training command, so what
inspect-data shows is exactly what the model trains on.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llava_cli.data.conversation import Conversation, RecordError, llava_normalize, parse_record
from llava_cli.data.image_paths import ImageOutsideFolder, confine, image_base, join_image_path
from llava_cli.data.images import ImageError, ImageLoader, check_image
from llava_cli.data.problems import ImageCheck, Problem
from llava_cli.data.sources.record import SourceRecord
from llava_cli.data.text.encoding import Encoded, TextEncoder, TokenizationMode
from llava_cli.data.text.templates import (
    CHAT_TEMPLATE,
    TEMPLATES,
    Rendered,
    canonical_template_name,
    mark_images,
    render,
    render_with_chat_template,
)

# Image size (width, height) → number of image tokens; fixed-size towers ignore the size.
TokenCounter = Callable[[tuple[int, int] | None], int]


# What the data checks read of each image (`images.check_image`): header, pixel limit and end
# ("fast"), or every byte decoded ("full").


@dataclass(frozen=True)
class DataOptions:
    """The data settings a sample depends on (a slice of the run configuration)."""

    template: str = "v1"
    tokenization: TokenizationMode = "hf"
    image_folder: str | None = None  # `image_paths.image_root`: given, else the data's folder
    image_aspect_ratio: str = "pad"
    model_max_length: int | None = 2048
    image_check: ImageCheck = "fast"  # what the data checks read of each image: `check_image`
    # Paths that leave `image_folder` ('../x.jpg', '/abs/x.jpg') are refused unless allowed.
    allow_images_outside_folder: bool = False
    mm_use_im_start_end: bool = False  # each image written as <im_start><image><im_end>


@dataclass(frozen=True)
class InputSpec:
    """What the model expects of its inputs, as far as building samples goes: its tokenizer
    (with `<image>`), the image token id, how many tokens an image becomes, and the image
    processor's mean colour (the pad and transparency colour). `model.inputs` makes it from a
    model (training) or from a tokenizer and a model folder (`inspect-data`)."""

    tokenizer: Any
    image_token_id: int
    count_image_tokens: TokenCounter
    image_mean: tuple[float, ...]
    note: str = ""  # where the image-token count came from, shown to the user


@dataclass
class Sample:
    """A tokenized record; `images` are RGB PIL images prepared for the processor."""

    record_id: str
    encoded: Encoded
    rendered: Rendered
    conversation: Conversation
    images: list[Any] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def trainable(self) -> bool:
        """False when truncation or the data left no supervised token (never train on it)."""
        return self.encoded.n_supervised > 0


class SampleBuilder:
    """Turns raw LLaVA records into `Sample`s with one set of data options."""

    def __init__(self, options: DataOptions, spec: InputSpec) -> None:
        self.options = options
        self.spec = spec
        self.template_name = canonical_template_name(options.template)
        self.template = TEMPLATES.get(self.template_name)
        self.tokenizer = spec.tokenizer
        self.count_image_tokens = spec.count_image_tokens
        self.images = ImageLoader(options.image_aspect_ratio, tuple(spec.image_mean))
        # Folder → (base, base with a trailing "/"): the run's and each mix source's, worked
        # out once each.
        self._folders: dict[str | None, tuple[str, str]] = {}
        self._folder(None)  # absolute now: the builder is the same in every worker
        self.encoder = TextEncoder(spec.tokenizer, spec.image_token_id, options.tokenization,
                                   options.model_max_length)

    def conversation(self, record: Any, position: int) -> Conversation:
        """Parse and validate a record for this template (raises `RecordError`)."""
        strict = self.template is not None and self.template.max_rounds is not None
        conv = parse_record(record, position, strict=strict)
        if self.template is not None and self.template.requires_image and not conv.images:
            raise RecordError(conv.record_id, Problem.NEEDS_IMAGE,
                              f"template {self.template_name!r} needs an image in every record")
        return llava_normalize(conv) if self.options.tokenization == "llava" else conv

    def render(self, conv: Conversation) -> Rendered:
        """Write the conversation out in the configured template (each image within its
        start/end tokens with `mm_use_im_start_end`)."""
        if self.template_name == CHAT_TEMPLATE:
            return render_with_chat_template(self.tokenizer, conv.messages, conv.system)
        assert self.template is not None
        messages = mark_images(conv.messages) if self.options.mm_use_im_start_end \
            else conv.messages
        return render(self.template, messages, conv.system)

    def image_path(self, relative: str, folder: str | None = None) -> str:
        """Where a record's image lives: relative paths resolve against `folder` (a mix
        source's image folder) or else the run's `image_folder` (`image_paths`' rule)."""
        return join_image_path(self._folder(folder)[0], relative)

    def _folder(self, folder: str | None) -> tuple[str, str]:
        if folder not in self._folders:
            base = image_base(folder if folder is not None else self.options.image_folder)
            self._folders[folder] = (base, os.path.join(base, ""))
        return self._folders[folder]

    def confined_image_path(self, record_id: str, relative: str,
                            folder: str | None = None) -> str:
        """`image_path`, refused (`RecordError`, before the file is touched) when it leaves
        the image folder (the source's, else the run's) and that is not allowed
        (`image_paths.confine`)."""
        base, inside = self._folder(folder)
        # Commands always give a folder (`model.inputs.sample_builder`); a builder made
        # without one (records in memory) has none to leave.
        free = self.options.allow_images_outside_folder or (
            folder is None and self.options.image_folder is None)
        try:
            return confine(base, relative, free, inside)
        except ImageOutsideFolder as err:
            raise RecordError(record_id, Problem.IMAGE_OUTSIDE_FOLDER,
                              f"{err} (allow such paths with --set "
                              "allow_images_outside_folder=true)") from None

    def build(self, record: Any, position: int = 0, load_images: bool = True,
              header_only: bool = False, last_reply_only: bool = False) -> Sample:
        """Make the sample for `record`. `load_images=False` skips the files entirely (counts
        then assume a fixed-size tower); `header_only` checks each image as the data checks
        do (`check_image`, fast or `full` as `image_check` says) and keeps only its size.
        `last_reply_only` supervises the conversation's last reply alone (preference pairs).
        Raises `RecordError` (structure, an image outside the folder) or `ImageError`
        (missing/corrupt/too large file, wrapped in a `RecordError` of kind 'bad-image').
        """
        conv = self.conversation(record, position)
        images, sizes = self._images(conv, load_images, header_only, record)
        return self.sample(conv, images, sizes, last_reply_only)

    def sample(self, conv: Conversation, images: list[Any], sizes: list[tuple[int, int]],
               last_reply_only: bool = False) -> Sample:
        """The sample of a parsed conversation whose images are already prepared (`sizes`
        decide the image-token counts; none given: a fixed-size tower's count)."""
        counts = [self.count_image_tokens(size) for size in (sizes or [None] * len(conv.images))]
        rendered = self.render(conv)
        if last_reply_only:  # one span per assistant message: the last is the final reply
            rendered = Rendered(rendered.text, rendered.spans[-1:])
        try:
            encoded = self.encoder(rendered, counts)
        except ValueError as err:
            raise RecordError(conv.record_id, Problem.IMAGE_TOKEN_MISMATCH, str(err)) from err
        return Sample(conv.record_id, encoded, rendered, conv, images, sizes)

    def _images(self, conv: Conversation, load: bool, header_only: bool, record: Any
                ) -> tuple[list[Any], list[tuple[int, int]]]:
        images, sizes = [], []
        if not load:
            return images, sizes
        full = self.options.image_check == "full"
        # Only a source reader makes a SourceRecord: its folder and bytes are not the data's.
        folder = record.image_folder if isinstance(record, SourceRecord) else None
        embedded = record.embedded if isinstance(record, SourceRecord) else {}
        for relative in conv.images:
            data = embedded.get(relative)
            path = self.confined_image_path(conv.record_id, relative, folder) \
                if data is None else io.BytesIO(data)
            try:
                if header_only:
                    sizes.append(check_image(path if data is None else data, label=relative,
                                             full=full))
                    continue
                decoded = self.images.decode(path, label=relative)
            except ImageError as err:
                raise RecordError(conv.record_id, Problem.BAD_IMAGE, str(err)) from err
            sizes.append(decoded.size)
            images.append(self.images.prepare(decoded))
        return images, sizes
