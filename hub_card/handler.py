"""Inference Endpoints custom handler for an M3EL linker, shipped at the root of the model repo.

Request: `{"inputs": MENTION or [MENTION, ...], "parameters": {"top_k": 5}}` (and optionally `"candidates": K`: only
the K entities of best estimated score are scored exactly, for a large KB; see the pipeline), where a MENTION is
`{"mention": "Jaguar", "text": "the Jaguar at the zoo today", "image": "<base64 image bytes or a data URL>"}` (`image`
optional). Response: the top-k entities of the mention (a list of `{"rank", "id", "name", "description", "score",
"probability", "image"}`), or one such list per mention; `image` is the entity image's path in the model repo.
A bad request (not JSON of that shape, a missing field, empty text, an unreadable image, top_k <= 0, ...) gets
`{"error": "<what is wrong>"}`, never a stack trace. Images must come inline: the endpoint opens no local path and
fetches no URL on a client's behalf.
"""

import base64
import binascii
import os

import torch
from transformers import pipeline

TASK = "multimodal-entity-linking"
PARAMETERS = ("top_k", "candidates")
MAX_MENTIONS = 256  # per request


class EndpointHandler:
    def __init__(self, path: str = "", device=None):
        self.path = os.path.abspath(path or ".")
        if device is None:
            device = 0 if torch.cuda.is_available() else -1
        self.linker = pipeline(TASK, model=self.path, trust_remote_code=True, device=device)

    def __call__(self, data: dict) -> list | dict:
        try:
            inputs, parameters = self._parse(data)
            results = self.linker(inputs, **parameters)
        except (ValueError, TypeError) as error:  # the pipeline's message says what is wrong with the request
            return {"error": str(error)}
        if isinstance(inputs, dict):
            return self._public(results)
        return [self._public(entities) for entities in results]

    def _parse(self, data) -> tuple[dict | list, dict]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('a request is {"inputs": a mention or a list of mentions, "parameters": {"top_k": k}}')
        unknown = sorted(set(data) - {"inputs", "parameters"})
        if unknown:
            raise ValueError(f"unknown request field(s) {', '.join(map(repr, unknown))}")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be an object, got {type(parameters).__name__}")
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(PARAMETERS)}")
        inputs = data["inputs"]
        if isinstance(inputs, list):
            if len(inputs) > MAX_MENTIONS:
                raise ValueError(f"at most {MAX_MENTIONS} mentions per request, got {len(inputs)}")
            return [_inline_image(mention, position) for position, mention in enumerate(inputs)], parameters
        if isinstance(inputs, dict):
            return _inline_image(inputs, 0), parameters
        raise ValueError(f"inputs must be a mention (an object) or a list of mentions, got {type(inputs).__name__}")

    def _public(self, entities: list[dict]) -> list[dict]:
        """Entity images as paths in the model repo (a path on the endpoint's disk means nothing to a client)."""
        public = []
        for entity in entities:
            entity = dict(entity)
            image = entity.get("image")
            if image and os.path.isabs(image):
                relative = os.path.relpath(image, self.path)
                entity["image"] = None if relative.startswith("..") else relative.replace(os.sep, "/")
            public.append(entity)
        return public


def _inline_image(mention, position: int):
    """The mention with its image as bytes (base64) or a data URL; anything else is refused."""
    if not isinstance(mention, dict) or mention.get("image") is None:
        return mention  # the pipeline explains what is wrong with a non-mention
    image = mention["image"]
    if not isinstance(image, str):
        raise ValueError(f"input {position}: 'image' must be a base64 string or a data URL, got {type(image).__name__}")
    if image.startswith("data:"):
        return mention  # the processor decodes base64 data URLs and refuses any other, opening no file
    try:
        compact = "".join(image.split())  # line breaks, as the `base64` command writes them
        altchars = b"-_" if "-" in compact or "_" in compact else None  # URL-safe base64
        data = base64.b64decode(compact, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"input {position}: 'image' is not base64 (send the image's bytes base64-encoded, or a data URL; "
            "paths and URLs are not opened)"
        ) from None
    return {**mention, "image": data}
