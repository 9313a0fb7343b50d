"""The `multimodal-entity-linking` pipeline: mentions (a name, its sentence, its image) in, a KB's top-k entities out."""

import codecs
import hashlib
import json
import numbers
import os
import re
import shutil
import threading
import warnings
import weakref
from collections.abc import Mapping

import torch
from transformers import Pipeline

from .index_m3el import INDEX_META, INDEX_WEIGHTS, EntityIndex, check_candidates, model_fingerprint

TASK = "multimodal-entity-linking"
ENTITIES_FILE = "entities.jsonl"  # the KB's metadata, one entity a line, in the JSON Lines benchmark layout
LOCAL_IMAGE_FOLDER = "entity_images/local"  # `save_pretrained`'s copies of entity images referenced by absolute paths
MENTION_FIELDS = ("mention", "text", "image")
UNREADABLE_IMAGE_MODES = ("error", "zero")


# a JSON string value of an "id" key, anywhere in a line (of the entity or of a nested object)
_ID_VALUE = re.compile(rb'"id"\s*:\s*("(?:[^"\\]|\\.)*")')
_MAX_MARKERS = 32  # wanted ids searched for as one regular expression; more: the ids of each line are read instead


def load_entities(path: str | os.PathLike, ids=None) -> list[dict]:
    """
    Read a KB's metadata: JSON Lines of `{"id": str, "name": str, "description": str, "images": [str]}` (`images`
    optional; paths relative to the file's folder, absolute paths or URLs), the layout of the benchmark loader's
    `entities.jsonl`, in UTF-8 (a byte order mark before the first line is allowed), lines ending in a line feed.
    `ids`: only the records of these entity ids (all of them, in file order), for a few results of a large KB: only
    the lines that can hold one of them are parsed (and so checked). A line can when it holds one of the ids as a JSON
    string as `json.dumps` writes it, or, for a line with escapes, when one of its `"id"` values decodes to one of
    them; with more than 32 ids, every line's `"id"` values are decoded and looked up.
    """
    wanted = markers = None
    if ids is not None:
        wanted = {str(i) for i in ids}
        if not wanted:
            return []
        if len(wanted) <= _MAX_MARKERS:  # one regular expression: about 0.5 s for a million lines
            forms = {form for i in wanted for form in (json.dumps(i), json.dumps(i, ensure_ascii=False))}
            # (an id with a lone surrogate cannot be in a UTF-8 file as it is: its escaped form can)
            markers = re.compile(b"|".join(re.escape(form.encode("utf-8", "surrogatepass")) for form in sorted(forms)))

    def may_hold_one(line: bytes) -> bool:
        if markers is not None and markers.search(line):
            return True
        # an id written with escapes ("\u00e9", "\/") is not found as json.dumps writes it: its decoded value is
        return (markers is None or b"\\" in line) and any(
            _decoded(value.decode("utf-8", "replace")) in wanted for value in _ID_VALUE.findall(line)
        )

    entities = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if _blank(line, number == 1) or wanted is not None and not may_hold_one(line):
                continue
            record = _parsed(line, path, number, first=number == 1)
            if wanted is None or record["id"] in wanted:
                entities.append(record)
    return entities


# a line whose top-level object starts with a string "id" (as `save_entities` and `m3el index` write them): its id is
# read without parsing the rest of the line
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*"([^"\\]*)"\s*[,}]')  # (an id with escapes: not matched)


class EntityRecords(Mapping):
    """
    A KB's metadata (`load_entities`'s records, by id) read from its `entities.jsonl` as they are asked for: opening
    scans the file for each record's id and where its line starts, so that a KB of millions of entities costs the
    pipeline neither the time to parse every line nor the memory to hold every record (a million records of about
    250 bytes: 0.9 GB as dicts, 0.11 GB here; `benchmarks/README.md`, section (e)).

    A line that starts with its `"id"` key, holds no other `"id"` key (nor one written with escapes) and no carriage
    return but its last, is parsed when its record is first asked for; any other line at once. An error names the
    file and the line either way. An id given on two lines: the later line. The file is held open (`close()`, or a
    `with` block, closes it; a pipeline closes those it opened) and read as it was when opened: a file replaced since
    (renamed over, as `save_entities` writes) is not seen; one changed in place is an error that says so.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.abspath(os.fspath(path))
        self._file = open(self.path, "rb")  # noqa: SIM115 (held: records are read from it as asked for)
        self._closer = weakref.finalize(self, self._file.close)  # (closed when dropped, too)
        self._lock = threading.Lock()
        try:
            self._offsets = self._scan()
        except BaseException:
            self.close()
            raise

    def _scan(self) -> dict[str, int]:
        """id -> where its line starts, in the file's order; the lines not read by their start parsed."""
        offsets: dict[str, int] = {}
        offset = 0
        for number, line in enumerate(self._file, start=1):
            entity_id = None
            match = _LEADING_ID.match(line)
            if (
                match is not None
                and line.find(b'"id"', match.end()) < 0
                and line.find(b"\\u006", match.end()) < 0  # ("\u0069d", "i\u0064": an "id" key written with escapes)
                and line.find(b"\r", 0, len(line) - 2) < 0
            ):
                try:
                    entity_id = match.group(1).decode("utf-8")
                except UnicodeDecodeError:
                    pass
            if entity_id is None and not _blank(line, number == 1):
                entity_id = _parsed(line, self.path, number, first=number == 1)["id"]
            if entity_id is not None:
                offsets[entity_id] = offset  # (an id on two lines: the later one)
            offset += len(line)
        return offsets

    def __getitem__(self, entity_id: str) -> dict:
        offset = self._offsets[entity_id]  # (a KeyError for an unknown id, as a dict)
        if self._file.closed:
            raise ValueError(f"{self!r} is closed: open the file again (EntityRecords(path))")
        with self._lock:
            self._file.seek(offset)
            line = self._file.readline()
        record = _parsed(line, self.path, lambda: self._line_number(offset), first=offset == 0)
        if record["id"] != entity_id:
            raise ValueError(f"{self.path}: changed since it was opened (the line of entity {entity_id!r} now holds "
                             f"{record['id']!r}); set the entities again")
        return record

    def __contains__(self, entity_id) -> bool:
        return entity_id in self._offsets

    def __iter__(self):
        return iter(self._offsets)

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"EntityRecords({self.path!r}, {len(self)} entities)"

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> "EntityRecords":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def holds(self, path: str | os.PathLike) -> bool:
        """Whether `path` is the file held open (not one written over it since)."""
        if self._file.closed:
            return False
        try:
            there = os.stat(path)
        except OSError:
            return False
        held = os.fstat(self._file.fileno())
        return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)

    def _line_number(self, offset: int) -> int:
        count = 0
        with self._lock:
            self._file.seek(0)
            while offset > 0:
                chunk = self._file.read(min(offset, 2**20))
                if not chunk:
                    break
                count += chunk.count(b"\n")
                offset -= len(chunk)
        return count + 1

    def __getstate__(self):  # (a copy or a pickle opens the file anew)
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def _blank(line: bytes, first: bool) -> bool:
    """Whether a line of an `entities.jsonl` holds nothing but white space (and the first line a byte order mark)."""
    return not (line[3:] if first and line.startswith(codecs.BOM_UTF8) else line).strip()


def _parsed(line: bytes, path, number, first: bool = False) -> dict:
    """One line of an `entities.jsonl` as a record, or a ValueError naming the file and the line (`number`: the
    line's number, or a function that finds it; `first`: the file's first line, which may start with a byte order
    mark)."""

    def where() -> str:
        return f"{path}, line {number() if callable(number) else number}"

    try:
        text = line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where()}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where()}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("id"), str):
        raise ValueError(f"{where()}: an entity needs a string 'id'")
    return record


def _decoded(json_string: str) -> str | None:
    try:
        return json.loads(json_string)
    except json.JSONDecodeError:
        return None


def save_entities(folder: str | os.PathLike, entities: list[dict]) -> str:
    """Write a KB's metadata (see `load_entities`) as `entities.jsonl` in `folder`; returns the file's path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ENTITIES_FILE)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:  # then renamed: a crash never leaves half a file
        for entity in entities:
            record = {"id": str(entity["id"]), "name": entity.get("name"), "description": entity.get("description")}
            # references only, not pixels
            record["images"] = [image for image in _with_images(entity)["images"] if isinstance(image, str)]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)
    return path


def check_mention(mention, position: int = 0) -> dict:
    """One pipeline input -> `{"mention", "text", "image"}`, or a ValueError that says what is wrong with it."""
    where = f"input {position}"
    if not isinstance(mention, dict):
        raise ValueError(
            f"{where}: a mention is a dict with 'mention', 'text' and optionally 'image', got {type(mention).__name__}"
        )
    unknown = sorted(set(mention) - set(MENTION_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; expected {MENTION_FIELDS}")
    for field in ("mention", "text"):
        if field not in mention:
            raise ValueError(f"{where}: missing field {field!r} (a mention needs 'mention' and 'text')")
        if not isinstance(mention[field], str):
            raise ValueError(f"{where}: {field!r} must be a string, got {type(mention[field]).__name__}")
        if not mention[field].strip():
            raise ValueError(f"{where}: {field!r} is empty")
    return {"mention": mention["mention"], "text": mention["text"], "image": mention.get("image"), "position": position}


def check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)


def _looks_local(location: str) -> bool:
    """A path meant for this machine rather than a Hub repo id ("name" or "namespace/name")."""
    return (os.path.isabs(location) or location.startswith(("./", "../", "~", ".\\", "..\\"))
            or location.count("/") > 1 or os.sep != "/" and os.sep in location)


def _is_url(value) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


class M3ELEntityLinkingPipeline(Pipeline):
    r"""
    Multimodal entity linking with M3EL: each mention (its name, the sentence it occurs in, the image posted with it)
    is scored against every entity of a KB, through an [`EntityIndex`] of the KB's precomputed entity features, and
    the `top_k` best entities are returned.

    ```python
    >>> from transformers import pipeline
    >>> linker = pipeline("multimodal-entity-linking", model="path/or/repo", trust_remote_code=True)
    >>> linker({"mention": "Jaguar", "text": "the Jaguar at the zoo today", "image": "post.jpg"}, top_k=3)
    [{'rank': 1, 'id': 'Q35694', 'name': 'Jaguar', 'description': '...', 'score': 4.21, 'probability': 0.93,
      'image': '...'}, ...]
    ```

    Inputs: one mention or a list of them, each a dict with `mention` and `text` (non-empty strings) and optionally
    `image`: a path, an http(s) URL, a `PIL.Image.Image`, a numpy array, bytes, a base64 string or a data URL; no image
    (absent or `None`) is scored with the all-zero image, as the model was trained.

    Outputs: for each mention, its `top_k` entities, best first, each a dict with `rank` (1-based), `id`, `name`,
    `description` and `image` (a local path or URL of the entity's first image, or `None`) from the KB's metadata,
    `score` (M3EL's final score) and `probability` (the softmax of the scores over the whole KB, or over the
    candidates with `candidates`). Ties keep an arbitrary order.

    Args:
        model ([`M3ELModel`]): the linker.
        processor ([`M3ELProcessor`]): its processor (loaded from the same folder by `pipeline(...)`).
        index (`EntityIndex`, `str` or `list[dict]`, *optional*):
            the KB. An `EntityIndex` built with this model; a folder (or Hub repo) holding one, saved with
            `EntityIndex.save`; or the KB's entities as dicts (`id`, `name`, `description`, `image` or `images`),
            indexed on the spot. Defaults to the index saved in the model's own folder or repo.
        entities (`str`, `list[dict]` or a mapping of ids to dicts, *optional*):
            the KB's metadata (names, descriptions, images) as an `entities.jsonl` path or as records. Defaults
            to the `entities.jsonl` next to the index; without metadata, results carry ids and scores only. A file is
            read as the results need it (`EntityRecords`: each line's id and offset held, not its record).
        top_k (`int`, *optional*, defaults to 5): entities returned per mention (at most the KB's size).
        candidates (`int`, *optional*): for a KB too large to score in full per request (hundreds of thousands of
            entities and more): only the `candidates` entities whose cheap estimate of the score is best (its dot
            products and the G2L parts' centres, `M3ELModel.score_estimate`) are scored exactly, and the `top_k` of
            those returned (`EntityIndex.topk(candidates=...)`). Approximate: an entity lifted above that cut only by
            its G2L parts is missed. By default every entity is scored.
        unreadable_image (`str`, *optional*, defaults to `"error"`):
            what to do with an image that is given but cannot be read. `"error"` raises a ValueError naming the
            mention, since a mistyped path or a truncated upload would otherwise be linked silently on text alone.
            `"zero"` does what the processor and the evaluation do: an all-zero image, with a warning, counted in
            `processor.num_unreadable_images`.

    `device` and `dtype` work as for every pipeline (`pipeline(..., device="cuda", dtype=torch.float16)`); the index
    follows the model's device and dtype (float16 keeps 3 more significant bits than bfloat16: on the trained demo
    model it gave every float32 rank, bfloat16 moved two near ties). `batch_size` batches the mentions.

    A model already in memory: transformers' `pipeline()` finds a custom task only from a repo or folder name, so
    build this class directly, e.g. `M3ELEntityLinkingPipeline(model=model, processor=processor, index=...)`; without
    the package, the class comes from the model's repo with
    `transformers.dynamic_module_utils.get_class_from_dynamic_module("pipeline_m3el.M3ELEntityLinkingPipeline",
    repo)`, or as `type(linker)` of a pipeline loaded once.
    """

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def __init__(self, model, processor=None, index=None, entities=None, **kwargs):
        if processor is None:
            raise ValueError("the multimodal-entity-linking pipeline needs the model's processor (M3ELProcessor)")
        super().__init__(model=model, processor=processor, **kwargs)
        index, folder, records = self._resolve_index(index)
        self.index = index.to(device=self.device, dtype=self.model.dtype)
        self._entity_folder = folder  # where relative entity image paths live: a local folder or a Hub repo id
        if entities is None and records is None and folder is not None:  # (image paths stay relative to `folder`)
            path = self._find_file(folder, ENTITIES_FILE)
            self.set_entities(path if path is not None else [], folder=folder)
        else:
            self.set_entities(entities if entities is not None else records or [])
        missing = [entity_id for entity_id in self.index.entity_ids if entity_id not in self.entities]
        if self.entities and missing:
            warnings.warn(f"{len(missing)} indexed entities have no metadata (e.g. {missing[:3]}); their names are None")

    # ------------------------------------------------------------------------------------------------ the KB

    def set_entities(
        self, entities: str | os.PathLike | list[dict] | Mapping, ids=None, folder: str | None = None
    ) -> None:
        """
        Replace the KB's metadata shown with the results: an `entities.jsonl` path, a list of dicts, or a mapping of
        ids to dicts such as an `EntityRecords` (`ids` is then not used). A path is read as records are asked for
        (`EntityRecords`: the file is scanned for ids, each line parsed when its entity is shown). `ids`: read only
        these entities' records from the file at once (`load_entities`), e.g. those of results already ranked, which
        spares even the scan; `save_pretrained` then reads the whole file again, so that the saved folder has every
        entity's metadata. `folder`: where the file's relative image paths live, a local folder or a Hub repo id
        (default: the file's folder).
        """
        previous = getattr(self, "_own_records", None)  # an EntityRecords this pipeline opened (not one given)
        if previous is not None and previous is not entities:
            previous.close()  # (the file it held open)
        self._own_records = None
        self._entity_file = None
        if isinstance(entities, Mapping):
            if folder is not None or isinstance(entities, EntityRecords):
                self._entity_folder = folder if folder is not None else os.path.dirname(entities.path)
            self.entities = entities
            return
        if isinstance(entities, (str, os.PathLike)):
            self._entity_folder = folder if folder is not None else os.path.dirname(os.path.abspath(entities))
            if ids is None:
                self.entities = self._own_records = EntityRecords(entities)
                return
            self._entity_file = os.fspath(entities)  # (a part of it read)
            entities = load_entities(entities, ids)
        self.entities = {str(record["id"]): record for record in entities}

    def _find_file(self, folder: str, name: str) -> str | None:
        """`name` in a local folder, or fetched from a Hub repo (None when it has no such file)."""
        if os.path.isdir(folder):
            path = os.path.join(folder, name)
            return path if os.path.isfile(path) else None
        from transformers.utils import cached_file

        return cached_file(folder, name, _raise_exceptions_for_missing_entries=False)

    def _resolve_index(self, index) -> tuple[EntityIndex, str | None, list[dict] | None]:
        """-> (the index, the folder or repo it came from, the entity records it was built from)."""
        if isinstance(index, EntityIndex):
            index.check_model(self.model)
            return index, None, None
        if isinstance(index, (list, tuple)):
            records = []
            for position, record in enumerate(index):
                if not isinstance(record, Mapping):
                    raise ValueError(f"index entity {position}: an entity is a dict with 'id', 'name', 'description' "
                                     f"and optionally 'image' or 'images', got {type(record).__name__}")
                missing = [field for field in ("id", "name", "description") if field not in record]
                if missing:
                    raise ValueError(f"index entity {position}: missing field(s) {', '.join(map(repr, missing))} "
                                     "(an entity needs 'id', 'name' and 'description')")
                records.append(dict(record))
            for record in records:  # `image` for the index, `images` for the metadata, as in entities.jsonl
                if "image" not in record:
                    record["image"] = (record.get("images") or [None])[0]
                record.setdefault("images", [record["image"]] if record["image"] is not None else [])
            built = EntityIndex.build(self.model, self.processor, records, progress=False)
            return built, None, records
        if index is not None and not isinstance(index, (str, os.PathLike)):
            raise ValueError(
                f"index must be an EntityIndex, a folder or Hub repo holding one, or a list of entity dicts, got "
                f"{type(index).__name__}"
            )
        location = index if index is not None else self.model.name_or_path
        if not location:
            raise ValueError(
                "no entity index: pass index= an EntityIndex, a folder saved with EntityIndex.save, or the KB's "
                "entities as dicts (the model was not loaded from a folder that could hold one)"
            )
        location = os.fspath(location)
        if os.path.isdir(location):
            location = os.path.abspath(location)  # entity image paths stay valid if the working directory changes
        elif _looks_local(location):
            raise ValueError(
                f"no such folder: {location} (index= a folder saved with EntityIndex.save, or a Hub repo id)"
            )
        meta = self._find_file(location, INDEX_META)
        if meta is None:
            raise ValueError(
                f"{location} holds no entity index ({INDEX_META}): pass index= an EntityIndex, a folder saved with "
                "EntityIndex.save, or the KB's entities as dicts"
            )
        if not os.path.isdir(location) and self._find_file(location, INDEX_WEIGHTS) is None:
            raise ValueError(f"{location} holds {INDEX_META} but not {INDEX_WEIGHTS}")
        return EntityIndex.load(os.path.dirname(meta), self.model), location, None

    def entity_image(self, entity_id: str) -> str | None:
        """The entity's first image as a local path or URL (fetched from the Hub when the KB lives there), or None."""
        return self._first_image(self.entities.get(entity_id) or {})

    def _first_image(self, record: dict) -> str | None:
        images = record.get("images") or []
        if not images or not isinstance(images[0], str):
            return None
        reference = images[0]
        if _is_url(reference) or os.path.isabs(reference) or self._entity_folder is None:
            return reference
        try:
            return self._find_file(self._entity_folder, reference)
        except (OSError, ValueError):  # offline, or the file is gone: no picture rather than no answer
            return None

    # ----------------------------------------------------------------------------------------- pipeline steps

    def _sanitize_parameters(self, top_k=None, unreadable_image=None, candidates=None):
        preprocess, forward = {}, {}
        if top_k is not None:
            forward["top_k"] = check_top_k(top_k)
        if candidates is not None:
            forward["candidates"] = check_candidates(candidates)
        if unreadable_image is not None:
            if unreadable_image not in UNREADABLE_IMAGE_MODES:
                raise ValueError(f"unreadable_image must be one of {UNREADABLE_IMAGE_MODES}, got {unreadable_image!r}")
            preprocess["unreadable_image"] = unreadable_image
        return preprocess, forward, {}

    def __call__(self, inputs, **kwargs):
        """
        Link one mention (a dict) or a list of them; returns one list of entities, or a list of such lists.
        Keyword arguments: `top_k`, `candidates`, `unreadable_image`, `batch_size`.
        """
        single = isinstance(inputs, dict)
        batch = [inputs] if single else inputs
        if not isinstance(batch, (list, tuple)):
            raise ValueError(f"inputs must be a mention (a dict) or a list of mentions, got {type(inputs).__name__}")
        if len(batch) == 0:
            raise ValueError("no mentions to link (an empty list)")
        batch = [check_mention(mention, position) for position, mention in enumerate(batch)]
        outputs = super().__call__(batch, **kwargs)
        return outputs[0] if single else outputs

    def preprocess(self, inputs, unreadable_image="error"):
        mention, text, image = inputs["mention"], inputs["text"], inputs["image"]
        where = f"input {inputs.get('position', 0)} (mention {mention!r})"
        if _is_url(image):
            from transformers.image_utils import load_image

            try:
                image = load_image(image)
            except Exception as error:  # any failure to fetch is an unreadable image, handled below
                if unreadable_image == "error":
                    raise ValueError(f"{where}: cannot fetch image {inputs['image']}: {error}") from None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            features = self.processor.process_mentions([mention], [text], [image])
        if unreadable_image == "error" and image is not None and not bool(features["has_image"][0]):
            # The processor's warning says why; its "using an all-zero image instead" does not hold here.
            reasons = [str(warning.message).split(". Using an all-zero image")[0] for warning in caught]
            raise ValueError(f"{where}: unreadable image ({'; '.join(reasons) or 'unknown reason'})")
        for warning in caught:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return dict(features)

    def _forward(self, model_inputs, top_k=5, candidates=None):
        features = self.model.encode(**model_inputs)
        if candidates is not None and candidates < len(self.index):
            # the exact scores of the candidates, all of them best first: the softmax is over them
            scores, rows, _ = self.index.topk(self.model, features, k=candidates, candidates=candidates)
            top_k = min(top_k, candidates)
            return {"scores": scores[:, :top_k], "rows": rows[:, :top_k],
                    "probabilities": scores.softmax(dim=1)[:, :top_k]}
        scores = self.index.scores(self.model, features).float()  # (B, E)
        values, rows = scores.topk(min(top_k, len(self.index)), dim=1)  # (B, k)
        probabilities = scores.softmax(dim=1).gather(1, rows)  # (B, k)
        return {"scores": values, "rows": rows, "probabilities": probabilities}

    def postprocess(self, model_outputs):
        results = []
        for rank, (row, score, probability) in enumerate(
            zip(model_outputs["rows"][0].tolist(), model_outputs["scores"][0].tolist(),
                model_outputs["probabilities"][0].tolist()),
            start=1,
        ):
            entity_id = self.index.entity_ids[row]
            described = self.describe(entity_id)
            image = described.pop("image")
            results.append({"rank": rank, **described, "score": score, "probability": probability, "image": image})
        return results

    def describe(self, entity_id: str) -> dict:
        """What the results show of an entity: `id`, `name`, `description` and `image` (see `entity_image`)."""
        record = self.entities.get(entity_id) or {}
        return {"id": entity_id, "name": record.get("name"), "description": record.get("description"),
                "image": self._first_image(record)}

    # ------------------------------------------------------------------------------------------------- saving

    def save_pretrained(self, save_directory: str | os.PathLike, entity_images: str = "copy", **kwargs):
        """
        Everything `pipeline("multimodal-entity-linking", model=save_directory, trust_remote_code=True)` needs: the
        model and its code with this pipeline's (registered in config.json's `custom_pipelines`), the processor, the
        entity index and the KB's metadata (`entities.jsonl`).

        `entity_images` (`"copy"` or `"reference"`, default `"copy"`): with `"copy"` the entity images go with it, so
        that the folder shows them on another machine (full size; `m3el export` ships thumbnails instead). An image
        referenced by a path relative to the KB's folder is copied to the same relative path; one referenced by an
        absolute path (as `m3el index` writes them) is copied to `entity_images/local/<digest of the path>
        <extension>`, and referenced there. URLs are written as they are. With `"reference"` every reference is
        written as it is held. Other keyword arguments go to the model's `save_pretrained`.
        """
        from transformers.dynamic_module_utils import custom_object_save

        if entity_images not in ("copy", "reference"):
            raise ValueError(f"entity_images must be 'copy' or 'reference', got {entity_images!r}")
        os.makedirs(save_directory, exist_ok=True)
        module = type(self).__module__.split(".")[-1]
        # (the fingerprint leaves `custom_pipelines` out: it names code, nothing the scores depend on, so the index
        # stays this model's)
        self.model.config.custom_pipelines = {
            TASK: {"impl": f"{module}.{type(self).__name__}", "pt": ["AutoModel"], "type": "multimodal"}
        }
        custom_object_save(self, save_directory)  # this file and the files it imports relatively
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory)
        index = self.index
        if {p.dtype for p in self.model.parameters()} & {torch.float16, torch.bfloat16}:
            # The checkpoint is saved in half precision, so loaded again (in any dtype) its weights are these: the
            # index, accepted for this model, is stamped with this model's fingerprints (the same encoding: what was
            # built on its content, a retriever, still serves).
            index = EntityIndex(index.tensors, index.entity_ids, model_fingerprint(self.model),
                                model_fingerprint(self.model, torch.float16), content_id=index.content_id)
        index.save(save_directory)
        entities = self.entities
        if self._entity_file is not None:  # only the results' records were read: the saved folder gets every one
            entities = {str(record["id"]): record for record in load_entities(self._entity_file)}
        if entities:
            records = [_with_images(entities[i]) for i in self.index.entity_ids if i in entities]
            if entity_images == "copy":
                records = self._copy_entity_images(records, save_directory)
            target = os.path.join(save_directory, ENTITIES_FILE)
            if self._own_records is None or not self._own_records.holds(target):
                save_entities(save_directory, records)  # (an EntityRecords given keeps the file it opened)
                return
            self._own_records.close()  # the file read is the one replaced (a file held open cannot be, on Windows)
            try:
                save_entities(save_directory, records)
            finally:  # the file now there, as written (or as it was)
                self.set_entities(target, folder=self._entity_folder)

    def _copy_entity_images(self, records: list[dict], save_directory: str | os.PathLike) -> list[dict]:
        """
        Copy the images that `records` reference by a local path into `save_directory`: a relative path (to the KB's
        folder) to the same path, an absolute one under `entity_images/local/` (each file once). Returns the records
        as they are to be saved, the absolute references replaced by their copies' relative paths. The references
        that could not be copied are kept as they are, and said in one warning.
        """
        target_root = os.path.abspath(save_directory)
        copied: dict[str, str | None] = {}  # reference -> its copy's relative path; None: not copied
        saved = []
        for record in records:
            images = []
            for reference in record["images"]:
                if not isinstance(reference, str) or _is_url(reference):
                    images.append(reference)
                    continue
                if reference not in copied:
                    copied[reference] = self._copy_entity_image(reference, target_root)
                images.append(copied[reference] or reference)
            saved.append({**record, "images": images})
        missing = [reference for reference, copy in copied.items() if copy is None]
        if missing:
            where = f"under {self._entity_folder}" if self._entity_folder is not None else "(no KB folder is known)"
            warnings.warn(
                f"{len(missing)} entity images referenced in {ENTITIES_FILE} were not copied to {save_directory}: "
                f"absolute paths that are not files, or relative paths not found {where} or out of it (e.g. "
                f"{missing[:3]}); the saved folder references them as they are"
            )
        return saved

    def _copy_entity_image(self, reference: str, target_root: str) -> str | None:
        """Copy one local image reference into `target_root`; its copy's path relative to it, or None."""
        if os.path.isabs(reference):
            if not os.path.isfile(reference):
                return None
            digest = hashlib.blake2b(reference.encode(), digest_size=8).hexdigest()
            relative = f"{LOCAL_IMAGE_FOLDER}/{digest}{os.path.splitext(reference)[1].lower()}"
            os.makedirs(os.path.join(target_root, LOCAL_IMAGE_FOLDER), exist_ok=True)
            shutil.copyfile(reference, os.path.join(target_root, relative))
            return relative
        target = os.path.abspath(os.path.join(target_root, reference))
        if not target.startswith(target_root + os.sep):
            return None  # a path out of the folder ("../x.jpg") cannot travel with it
        if self._entity_folder is None:  # nowhere to find it, unless already there (`m3el export`'s thumbnails)
            return reference if os.path.isfile(target) else None
        try:
            source = self._find_file(self._entity_folder, reference)
        except (OSError, ValueError):
            source = None
        if source is None:
            return None
        if os.path.abspath(source) != target:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
        return reference


def _with_images(record: dict) -> dict:
    """A metadata record with its images as a list, `images` (or a single `image`, as the index's records have)."""
    images = record.get("images") or ([record["image"]] if record.get("image") is not None else [])
    return {**record, "images": list(images)}


__all__ = [
    "EntityRecords", "M3ELEntityLinkingPipeline", "TASK", "check_mention", "check_top_k", "load_entities",
    "save_entities",
]
