"""M3EL processor: mention and entity texts and images to model inputs, exactly as the published model saw them."""

import base64
import binascii
import io
import os
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin


class M3ELProcessor(ProcessorMixin):
    r"""
    Builds M3EL inputs (a text and an optional image per mention or entity) with a CLIP tokenizer and a CLIP image processor.

    - Mention text: `unquote(mention) + separator + sentence`; entity text: `unquote(name) + separator + description`;
      tokenized, truncated and padded to exactly `text_max_length` tokens (the model does not mask padding).
    - Image: a path, a `PIL.Image.Image`, a numpy array (H, W[, C]), raw bytes or a base64 string; resized to the
      image processor's crop size with Lanczos in its own mode, converted to RGB as the authors' preprocessing did
      (PIL's plain conversion: a transparent pixel keeps its colour, where transformers 5 would composite it onto
      white), then CLIP preprocessing (normalisation).
      `None` gives an all-zero image. An unreadable image also gives an all-zero image (as the authors' code
      did silently), but here with a warning naming it, and it is counted in `num_unreadable_images`.
      The per-sample flag `has_image` says which samples had a readable image.
    - Many batches (a KB, an evaluation split): `prefetched` reads the images of the next batches in threads while
      the current one is used.

    Args:
        image_processor ([`CLIPImageProcessor`]): CLIP's image processor.
        tokenizer ([`CLIPTokenizer`]): CLIP's tokenizer.
        text_max_length (`int`, *optional*, defaults to 40): every text is padded or truncated to this length.
        text_separator (`str`, *optional*, defaults to `" [SEP] "`): joins mention and sentence, name and description.
    """

    _count_lock = threading.Lock()  # `num_unreadable_images` counts images read in several threads (`prefetched`)

    def __init__(self, image_processor=None, tokenizer=None, text_max_length: int = 40, text_separator: str = " [SEP] "):
        if text_max_length < 2:
            raise ValueError(f"text_max_length must be at least 2 (start and end tokens), got {text_max_length}")
        self.text_max_length = text_max_length
        self.text_separator = text_separator
        self.num_unreadable_images = 0
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # `pipeline(..., dtype=...)` hands the model's loading arguments to the processor as well (transformers drops
        # them for a tokenizer, not for a processor); the tokenizer would keep a torch.dtype among its init arguments
        # and then fail to write its config in `save_pretrained` (not JSON). They mean nothing to a processor.
        for key in ("dtype", "torch_dtype"):
            kwargs.pop(key, None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # --------------------------------------------------------------------------------------------------- text

    def mention_text(self, mention: str, sentence: str) -> str:
        return unquote(mention) + self.text_separator + sentence

    def entity_text(self, name: str, description: str) -> str:
        return unquote(name) + self.text_separator + description

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.text_max_length, return_tensors="pt"
        )

    # -------------------------------------------------------------------------------------------------- images

    @property
    def image_size(self) -> tuple[int, int]:
        crop = self.image_processor.crop_size
        return int(crop["height"]), int(crop["width"])

    def _open_image(self, image) -> Image.Image:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
            return Image.fromarray(image)
        if isinstance(image, (bytes, bytearray)):
            return _open_bytes(image)
        if isinstance(image, (str, os.PathLike)):
            text = str(image)
            if not text.strip():
                raise ValueError("an empty string is not an image (None means no image)")
            if text.startswith("data:"):  # a data URL: data:[<media type>][;base64],<data>
                header, comma, data = text.partition(",")
                if not comma or not header.lower().endswith(";base64"):
                    raise ValueError("a data URL of an image must be base64-encoded (data:image/...;base64,...)")
                try:
                    return _open_bytes(_decode_base64(data))
                except (binascii.Error, ValueError):
                    raise ValueError("the data URL's payload is not valid base64") from None
            if os.path.exists(text):
                return Image.open(text)
            try:
                data = _decode_base64(text)
            except (binascii.Error, ValueError):
                raise FileNotFoundError(f"no such image file: {text}") from None
            try:
                return _open_bytes(data)
            except UnidentifiedImageError:  # a mistyped path can happen to be valid base64 ("cat-1234")
                raise FileNotFoundError(f"no such image file: {text} (nor base64 of an image)") from None
        raise TypeError(f"unsupported image type {type(image).__name__}")

    def load_image(self, image, name: str | None = None) -> tuple[torch.Tensor, bool]:
        """One image -> (pixel_values (3, H, W), readable). `None` or an unreadable image gives zeros."""
        height, width = self.image_size
        if image is None:
            return torch.zeros(3, height, width), False
        try:
            # The authors resized before CLIP preprocessing, in the image's own mode; so do we. Their CLIP
            # preprocessing (transformers 4.27) then converted to RGB with PIL's plain `convert("RGB")`, which keeps a
            # transparent pixel's own colour; transformers 5 composites transparency onto white instead, which would
            # change the pixels of every image with an alpha channel or a transparent palette colour (PNG logos and
            # flags among KB images). Converting here keeps the authors' pixels: the image processor then gets an RGB
            # image without transparency (PIL carries a palette's transparent colour over as `info["transparency"]`).
            resized = self._open_image(image).resize((width, height), Image.Resampling.LANCZOS).convert("RGB")
            resized.info.pop("transparency", None)
        except (OSError, ValueError, TypeError, UnidentifiedImageError, Image.DecompressionBombError) as error:
            with self._count_lock:
                self.num_unreadable_images += 1
            label = name or (str(image) if isinstance(image, (str, os.PathLike)) else f"<{type(image).__name__}>")
            if len(label) > 200:
                label = label[:200] + "..."
            warnings.warn(
                f"Unreadable image {label}: {error}. Using an all-zero image instead "
                f"({self.num_unreadable_images} unreadable so far).",
                stacklevel=3,
            )
            return torch.zeros(3, height, width), False
        pixel_values = self.image_processor(resized, return_tensors="pt")["pixel_values"][0]
        return pixel_values, True

    def _images(self, images, count: int, names: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
        if images is None:
            images = [None] * count
        if len(images) != count:
            raise ValueError(f"got {len(images)} images for {count} texts; pass None for a sample without image")
        loaded = [self.load_image(image, None if names is None else names[i]) for i, image in enumerate(images)]
        pixel_values = torch.stack([pixels for pixels, _ in loaded]) if loaded else torch.zeros(0, 3, *self.image_size)
        return pixel_values, torch.tensor([ok for _, ok in loaded], dtype=torch.bool)

    # ----------------------------------------------------------------------------------------------- batches

    def process_mentions(self, mentions, sentences, images=None, image_names=None) -> BatchFeature:
        """Mention inputs: `input_ids`, `attention_mask` (B, L), `pixel_values` (B, 3, H, W), `has_image` (B,)."""
        return self._batch(*self._texts("mention", mentions, sentences, images), image_names)

    def process_entities(self, names, descriptions, images=None, image_names=None) -> BatchFeature:
        """Entity inputs, same keys as `process_mentions`. Pass one image per entity (the first one to evaluate)."""
        return self._batch(*self._texts("entity", names, descriptions, images), image_names)

    def prefetched(self, side: str, batches: Iterable[tuple], num_workers: int = 0) -> Iterator[BatchFeature]:
        """
        `process_mentions` (`side` "mention") or `process_entities` ("entity") of each batch of `batches`, in order:
        a batch is a tuple of that method's arguments (texts, texts, images[, image names]). With `num_workers` > 0,
        that many threads read and resize the images of the next batches while the caller uses the current one
        (Pillow and numpy release the GIL: on 2 cores about 1.8 times the images/s of one thread), at most
        `num_workers + 1` batches ahead. The texts are tokenized in the calling thread (a fast tokenizer must not
        be shared across threads). The same inputs as the methods give, warnings and counts included.
        """
        if side not in ("mention", "entity"):
            raise ValueError(f"side must be 'mention' or 'entity', got {side!r}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be at least 0, got {num_workers}")

        def read(batch: tuple):  # (texts, (pixel values, has_image))
            texts, images = self._texts(side, *batch[:3])
            return texts, self._images(images, len(texts), batch[3] if len(batch) > 3 else None)

        batches = iter(batches)
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="m3el-images") if num_workers else None
        pending: deque = deque()

        def submit() -> None:  # the next batch, if any: its images read in a thread (or later, without threads)
            batch = next(batches, None)
            if batch is not None:
                pending.append(pool.submit(read, batch) if pool is not None else batch)

        try:
            for _ in range(num_workers + 1):
                submit()
            while pending:
                head = pending.popleft()
                submit()
                texts, (pixel_values, has_image) = head.result() if pool is not None else read(head)
                yield self._assemble(self._tokenize(texts), pixel_values, has_image)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _texts(self, side: str, first, second, images) -> tuple[list[str], list | None]:
        names = ("mentions", "sentences") if side == "mention" else ("names", "descriptions")
        first, second, images = _as_batch(first, second, images, names)
        text = self.mention_text if side == "mention" else self.entity_text
        return [text(a, b) for a, b in zip(first, second)], images

    def _batch(self, texts: list[str], images, image_names) -> BatchFeature:
        encoded = self._tokenize(texts)
        return self._assemble(encoded, *self._images(images, len(texts), image_names))

    @staticmethod
    def _assemble(encoded, pixel_values: torch.Tensor, has_image: torch.Tensor) -> BatchFeature:
        return BatchFeature(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "pixel_values": pixel_values,
                "has_image": has_image,
            }
        )

    def __call__(
        self,
        mentions=None,
        sentences=None,
        images=None,
        entity_names=None,
        entity_descriptions=None,
        entity_images=None,
        **kwargs,
    ) -> BatchFeature:
        """
        Mention inputs, entity inputs, or both (entity keys prefixed with `entity_`), ready for `M3ELModel(**inputs)`.
        The tensors are PyTorch's (`return_tensors="pt"` is accepted, and is the only kind).
        """
        return_tensors = kwargs.pop("return_tensors", "pt")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: this processor returns PyTorch tensors only ('pt')")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        if mentions is None and entity_names is None:
            raise ValueError("give mentions (with sentences), entities (entity_names with entity_descriptions), or both")
        output = {}
        if mentions is not None:
            if sentences is None:
                raise ValueError("mentions need their sentences")
            output.update(self.process_mentions(mentions, sentences, images))
        if entity_names is not None:
            if entity_descriptions is None:
                raise ValueError("entity_names need their entity_descriptions")
            entities = self.process_entities(entity_names, entity_descriptions, entity_images)
            output.update({f"entity_{key}": value for key, value in entities.items()})
        return BatchFeature(output)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "has_image"]


def _decode_base64(text: str) -> bytes:
    """Standard or URL-safe base64, line breaks and other whitespace ignored (as `base64` the command writes it)."""
    text = "".join(text.split())
    if "-" in text or "_" in text:
        return base64.b64decode(text, altchars=b"-_", validate=True)
    return base64.b64decode(text, validate=True)


def _open_bytes(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's own message names an in-memory file object, not the data
        raise UnidentifiedImageError(f"not an image format PIL reads ({len(data)} bytes)") from None


def _as_batch(first, second, images, names: tuple[str, str]):
    """Accept one sample (strings and a single image) or a batch (lists); return lists."""
    if isinstance(first, str) != isinstance(second, str):
        raise ValueError(f"{names[0]} and {names[1]} must both be strings or both be lists")
    if isinstance(first, str):
        return [first], [second], [images]
    first, second = list(first), list(second)
    if len(first) != len(second):
        raise ValueError(f"got {len(first)} {names[0]} but {len(second)} {names[1]}")
    if not first:
        raise ValueError(f"no samples: {names[0]} and {names[1]} are empty")
    if isinstance(images, (str, bytes, bytearray)):  # one image for a batch: list() would split it into characters
        raise ValueError(f"{names[0]} and {names[1]} are lists, so the images must be a list too (one per sample, "
                         f"None for none), got a single {type(images).__name__}")
    for index, (a, b) in enumerate(zip(first, second)):
        if not isinstance(a, str) or not isinstance(b, str):
            raise ValueError(f"sample {index}: {names[0]} and {names[1]} must be strings, got {type(a).__name__}, "
                             f"{type(b).__name__}")
    return first, second, images if images is None else list(images)


__all__ = ["M3ELProcessor"]
