"""Entity linking data for M3EL: the benchmark release layout, a JSON Lines layout, training batches, a batch sampler.

Two on-disk layouts load into one in-memory `MELBenchmark`:

- the layout WikiMEL, RichpediaMEL and WikiDiverse are distributed in ("mimic": the MIMIC paper's release, as the
  M3EL authors used it): `kb_entity.json`, `qid2id.json`, `{WIKIMEL,RichpediaMEL,WikiDiverse,wiki_diverse}_{train,dev,test}.json`,
  images in `kb_image/` and `mention_image/` (or `mention_images/`);
- JSON Lines for your own KB: `entities.jsonl` and `train.jsonl`, `dev.jsonl`, `test.jsonl`, image paths relative to
  the folder.

Images stay paths; `M3ELProcessor` reads them when a batch is built. Nothing is cached or written next to the data.
"""

import difflib
import json
import os
from collections import deque
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import datasets
import numpy as np
import torch
from transformers import BatchFeature

from .model_card import DEMO_DATASET, DEMO_MANIFEST

SPLITS = ("train", "dev", "test")

# Split file prefixes of the release, per dataset (the authors' configs: WIKIMEL_train.json, WikiDiverse_dev.json).
BENCHMARK_SPLIT_PREFIXES = {
    "WikiMEL": ("WIKIMEL",),
    "RichpediaMEL": ("RichpediaMEL",),
    "WikiDiverse": ("WikiDiverse", "wiki_diverse"),
}
KB_ENTITY_FILE = "kb_entity.json"
QID2ID_FILE = "qid2id.json"
KB_IMAGE_FOLDER = "kb_image"
MENTION_IMAGE_FOLDERS = ("mention_image", "mention_images")
NIL_ANSWER = "nil"  # the release's answer for a mention whose entity is not in the KB

JSONL_ENTITY_FILE = "entities.jsonl"
JSONL_ENTITY_FIELDS = ("id", "name", "description", "images")  # others are counted and named in the summary
JSONL_MENTION_FIELDS = ("id", "mention", "sentence", "image", "answer")  # `id` (optional) is named in errors
# Names that are probably meant as a split file (`validation.jsonl` for `dev.jsonl`): said when the split is missing.
SPLIT_NEAR_MISSES = {"train": ("training",), "dev": ("validation", "valid", "val", "development"),
                     "test": ("testing",)}

ENTITY_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "name": datasets.Value("string"),
        "description": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Value("string")),  # absolute paths of the files that exist
    }
)
MENTION_FEATURES = datasets.Features(
    {
        "mention": datasets.Value("string"),
        "sentence": datasets.Value("string"),
        "image": datasets.Value("string"),  # absolute path, or None
        "answer": datasets.Value("string"),  # the gold entity's id
    }
)
MISSING_EXAMPLES = 5  # missing image files named in a report, per list


class MELDataError(ValueError):
    """A data file that cannot be used as it is; the message names the file and the record or line."""

    def __init__(self, path, message: str, *, record: int | None = None, record_id=None, line: int | None = None,
                 column: int | None = None):
        self.path, self.record, self.record_id, self.line, self.column = str(path), record, record_id, line, column
        where = str(path)
        if line is not None:
            where += f", line {line}" + (f", column {column}" if column is not None else "")
        if record is not None:
            where += f", record {record}"
        if record_id is not None:
            where += f" (id {record_id!r})"
        super().__init__(f"{where}: {message}")


class MissingSplitError(MELDataError):
    """A split asked for has no file in the folder (the message names the file looked for)."""


# ------------------------------------------------------------------------------------------------------ result


@dataclass
class MELSplitReport:
    """What loading one split kept and left out."""

    file: str
    mentions: int = 0  # kept: gold entity in the KB
    nil_dropped: int = 0  # answer nil: no gold entity in the KB, left out, as in the authors' evaluation
    without_image: int = 0  # kept mentions with no image: none given, or its file is missing
    missing_images: int = 0  # image given but no such file (counted in without_image too)
    missing_image_examples: list[str] = field(default_factory=list)
    unknown_fields: dict[str, tuple[int, int]] = field(default_factory=dict)  # JSON Lines: name -> (line, records)


@dataclass
class MELReport:
    """Counts for logs: what was loaded, and every substitution made on the way (nothing is dropped silently)."""

    entities: int = 0
    entities_without_images: int = 0  # no image listed, or none of the listed files exists
    missing_entity_images: int = 0  # listed image files that do not exist (dropped from the entity's images)
    missing_entity_image_examples: list[str] = field(default_factory=list)
    entities_without_qid: int = 0  # mimic layout: kb_entity ids absent from qid2id.json (id kept as a string)
    unknown_entity_fields: dict[str, tuple[int, int]] = field(default_factory=dict)  # JSON Lines: (first line, records)
    splits: dict[str, MELSplitReport] = field(default_factory=dict)
    missing_splits: dict[str, str] = field(default_factory=dict)  # JSON Lines, splits=None: split -> looked for what
    ignored_files: list[str] = field(default_factory=list)  # JSON Lines, splits=None: *.jsonl that are no split file
    notes: list[str] = field(default_factory=list)


@dataclass
class MELBenchmark:
    """
    A KB and its mention splits, as loaded by `load_benchmark`.

    Attributes:
        name (`str`): the dataset's name (`WikiMEL`, `RichpediaMEL`, `WikiDiverse`, or the folder's name).
        root (`str`): the absolute path of the folder it was read from.
        layout (`str`): `"mimic"` (the release layout of the three benchmarks) or `"jsonl"`.
        entities (`datasets.Dataset`): `id` (str; the QID in the mimic layout), `name`, `description`,
            `images` (absolute paths); in KB order (the mimic layout: sorted by the release's integer id).
        splits (`dict[str, datasets.Dataset]`): split -> `mention`, `sentence`, `image` (absolute path or None),
            `answer` (the gold entity's id). Mentions without a gold entity (nil) are left out and counted.
        report ([`MELReport`]): counts of what was kept, left out and missing.
    """

    name: str
    root: str
    layout: str
    entities: datasets.Dataset
    splits: dict[str, datasets.Dataset]
    report: MELReport

    @cached_property
    def entity_index(self) -> dict[str, int]:
        """Entity id -> its row in `entities` (the column of the gold entity in a KB-wide score matrix)."""
        return {entity_id: row for row, entity_id in enumerate(self.entities["id"])}

    def summary(self) -> str:
        report = self.report
        lines = [f"{self.name} ({self.layout} layout) at {self.root}"]
        kb = f"  kb: {report.entities} entities, {report.entities_without_images} without images"
        kb += _missing(report.missing_entity_images, report.missing_entity_image_examples)
        if report.entities_without_qid:
            kb += f", {report.entities_without_qid} without a QID in {QID2ID_FILE}"
        lines.append(kb)
        lines += _unknown_fields(JSONL_ENTITY_FILE, report.unknown_entity_fields, JSONL_ENTITY_FIELDS)
        for split, counts in report.splits.items():
            line = (f"  {split} ({os.path.basename(counts.file)}): {counts.mentions} mentions, "
                    f"{counts.nil_dropped} nil left out, {counts.without_image} without image")
            lines.append(line + _missing(counts.missing_images, counts.missing_image_examples))
            lines += _unknown_fields(os.path.basename(counts.file), counts.unknown_fields, JSONL_MENTION_FIELDS)
        lines += [f"  {split}: none, {looked_for}" for split, looked_for in report.missing_splits.items()]
        if report.ignored_files:
            lines.append(f"  ignored (no split file: splits are {', '.join(f'{split}.jsonl' for split in SPLITS)}; "
                         f"splits=[...] loads others): {', '.join(report.ignored_files)}")
        lines += [f"  note: {note}" for note in report.notes]
        return "\n".join(lines)

    def require_splits(self, splits: Sequence[str] = SPLITS) -> None:
        """
        Raise a `MELDataError` for the first of `splits` that was not loaded or holds no mentions (what training needs),
        naming the file looked for and a near miss found instead (`validation.jsonl` for `dev.jsonl`).
        """
        for split in splits:
            if split not in self.splits:
                looked_for = self.report.missing_splits.get(split, "it was not loaded (see splits=)")
                raise MissingSplitError(self.root, f"the {split} split is missing: {looked_for}")
            if len(self.splits[split]) == 0:
                counts = self.report.splits[split]
                nil = f" ({counts.nil_dropped} with a nil answer left out)" if counts.nil_dropped else ""
                raise MELDataError(counts.file, f"the {split} split holds no mentions{nil}")


def _missing(count: int, examples: list[str]) -> str:
    if not count:
        return ", no missing image files"
    return f", {count} missing image files (e.g. {', '.join(examples)})"


def _unknown_fields(file: str, fields: dict[str, tuple[int, int]], known: Sequence[str]) -> list[str]:
    """Summary lines for the fields of a JSON Lines file that are not read, with the known field they resemble."""
    lines = []
    for name, (line, records) in fields.items():
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else f" (fields read: {', '.join(known)})"
        where = f"line {line}" if records == 1 else f"{records} records, the first on line {line}"
        lines.append(f"  {file}: unknown field {name!r}, not read ({where}){hint}")
    return lines


# --------------------------------------------------------------------------------------------------- loaders


def load_benchmark(root, splits: Sequence[str] | None = None, name: str | None = None) -> MELBenchmark:
    """
    Load a folder in either layout: `entities.jsonl` means JSON Lines (`load_jsonl_benchmark`), `kb_entity.json`
    the release layout (`load_mimic_benchmark`). `splits=None` loads train, dev and test (JSON Lines: those of
    `train.jsonl`, `dev.jsonl`, `test.jsonl` present; the others are named in the report).
    """
    if os.path.isfile(os.path.join(root, JSONL_ENTITY_FILE)):
        return load_jsonl_benchmark(root, splits=splits, name=name)
    if os.path.isfile(os.path.join(root, KB_ENTITY_FILE)):
        return load_mimic_benchmark(root, splits=splits, name=name)
    raise MELDataError(root, f"no {JSONL_ENTITY_FILE} (JSON Lines layout) and no {KB_ENTITY_FILE} (release layout)")


def load_mimic_benchmark(root, splits: Sequence[str] | None = None, name: str | None = None) -> MELBenchmark:
    """
    Load WikiMEL, RichpediaMEL or WikiDiverse from the release layout, as the authors' code read it: entities sorted
    by `id`, gold answers (QIDs) mapped through `qid2id.json`, a mention's image found by the base name of `imgPath`
    with a `.jpg` extension (the release converted every mention image to jpg). `name` is resolved from the split
    file names present when not given (the built-in demo's folder, which `modeling_m3el.demo` writes in this
    layout with WikiMEL's file names and a `DEMO_MANIFEST`: `DEMO_DATASET`). Missing image files are counted and
    reported, the mention or entity kept.
    """
    root = os.path.abspath(root)
    given = name
    name, split_files, notes = _benchmark_split_files(root, name, SPLITS if splits is None else tuple(splits))
    if given is None and os.path.isfile(os.path.join(root, DEMO_MANIFEST)):
        name = DEMO_DATASET
    report = MELReport(notes=notes)
    files = _FileIndex()

    qid2id = _read_qid2id(os.path.join(root, QID2ID_FILE))
    kb_path = os.path.join(root, KB_ENTITY_FILE)
    records = _read_json(kb_path, list)
    if not records:
        raise MELDataError(kb_path, "no entities")
    for index, record in enumerate(records):
        _check_fields(kb_path, index, record, {"id": int, "entity_name": str, "image_list": list})
        if not isinstance(record.get("desc", record.get("attr")), str):  # older releases: attr instead of desc
            raise MELDataError(kb_path, "needs a string field 'desc' (or 'attr')", record=index, record_id=record["id"])
        if record.get("type", "entity") != "entity":
            raise MELDataError(kb_path, f"type {record['type']!r} is not 'entity'", record=index,
                               record_id=record["id"])
        if not all(isinstance(image, str) for image in record["image_list"]):
            raise MELDataError(kb_path, "image_list must be a list of file names", record=index,
                               record_id=record["id"])
    order = sorted(range(len(records)), key=lambda index: records[index]["id"])  # the authors sort by id
    for previous, index in zip(order, order[1:]):
        if records[previous]["id"] == records[index]["id"]:
            raise MELDataError(kb_path, f"id {records[index]['id']} is also the id of record {previous}",
                               record=index, record_id=records[index]["id"])

    qid_of = {}
    for qid, entity_id in qid2id.items():
        qid_of.setdefault(entity_id, qid)  # several QIDs for one entity: the first names it
    kb_image_folder = os.path.join(root, KB_IMAGE_FOLDER)
    entities = {key: [] for key in ENTITY_FEATURES}
    id_string = {}
    for index in order:
        record = records[index]
        if record["id"] in qid_of:
            id_string[record["id"]] = qid_of[record["id"]]
        else:
            id_string[record["id"]] = str(record["id"])
            report.entities_without_qid += 1
        entities["id"].append(id_string[record["id"]])
        entities["name"].append(record["entity_name"])
        entities["description"].append(record["desc"] if isinstance(record.get("desc"), str) else record["attr"])
        entities["images"].append(_existing_entity_images(record["image_list"], kb_image_folder, files, report))
    _count_entities(entities, report)

    mention_image_folder = next((os.path.join(root, folder) for folder in MENTION_IMAGE_FOLDERS
                                 if os.path.isdir(os.path.join(root, folder))), None)
    if mention_image_folder is None:
        report.notes.append(f"no mention image folder ({' or '.join(MENTION_IMAGE_FOLDERS)}): no mention has an image")
        mention_image_folder = os.path.join(root, MENTION_IMAGE_FOLDERS[0])

    loaded = {}
    for split, path in split_files.items():
        counts = report.splits[split] = MELSplitReport(file=path)
        mentions = {key: [] for key in MENTION_FEATURES}
        for index, record in enumerate(_read_json(path, list)):
            _check_fields(path, index, record, {"sentence": str, "mentions": str, "imgPath": (str, type(None)),
                                                "answer": (str, type(None))})
            if record["answer"] is None or record["answer"] == NIL_ANSWER:
                counts.nil_dropped += 1
                continue
            if record["answer"] not in qid2id:
                raise MELDataError(path, f"answer {record['answer']!r} is not in {QID2ID_FILE}", record=index,
                                   record_id=record.get("id"))
            if qid2id[record["answer"]] not in id_string:
                raise MELDataError(path, f"answer {record['answer']!r} maps to id {qid2id[record['answer']]} in "
                                   f"{QID2ID_FILE}, which no entity of {KB_ENTITY_FILE} has", record=index,
                                   record_id=record.get("id"))
            image = None
            if record["imgPath"]:
                # The release converted every mention image to jpg: base name, first dot, '.jpg' (the authors' rule).
                file_name = record["imgPath"].split("/")[-1].split(".")[0] + ".jpg"
                image = _existing_image(os.path.join(mention_image_folder, file_name), files, counts)
            mentions["mention"].append(record["mentions"])
            mentions["sentence"].append(record["sentence"])
            mentions["image"].append(image)
            mentions["answer"].append(id_string[qid2id[record["answer"]]])
        loaded[split] = _finish_split(mentions, counts)
    return MELBenchmark(name, root, "mimic", datasets.Dataset.from_dict(entities, features=ENTITY_FEATURES),
                        loaded, report)


def load_jsonl_benchmark(root, splits: Sequence[str] | None = None, name: str | None = None) -> MELBenchmark:
    """
    Load your own KB and mentions from JSON Lines (one JSON object per line, UTF-8; blank lines are skipped):

    - `entities.jsonl`: `{"id": str, "name": str, "description": str, "images": [paths]}` (`images` optional; the
      id `nil` is reserved);
    - `{split}.jsonl`: `{"mention": str, "sentence": str, "image": path or null, "answer": entity id, "nil" or null}`
      (`image` optional; `id` optional, named in errors; answer `"nil"` or null for a mention whose entity is not in
      the KB: left out and counted).

    Relative image paths are relative to the folder. `splits=None` loads those of `train.jsonl`, `dev.jsonl` and
    `test.jsonl` present; the absent ones (with a near miss such as `validation.jsonl`) and the other `*.jsonl` files
    are named in the report, and `splits=[...]` loads any `{split}.jsonl`. Fields not listed above are not read: they
    are counted and named (first line) in the report, not refused, so records may carry metadata of their own.
    """
    root = os.path.abspath(root)
    report = MELReport()
    files = _FileIndex()
    entity_path = os.path.join(root, JSONL_ENTITY_FILE)
    entities = {key: [] for key in ENTITY_FEATURES}
    first_line = {}
    for line, record in _read_jsonl(entity_path):
        _check_fields(entity_path, None, record, {"id": str, "name": str, "description": str}, line=line,
                      optional={"images": list})
        if record["id"] == NIL_ANSWER:
            raise MELDataError(entity_path, f"the id {NIL_ANSWER!r} is reserved: an answer {NIL_ANSWER!r} means that "
                               "the mention's entity is not in the KB", line=line, record_id=record["id"])
        if record["id"] in first_line:
            raise MELDataError(entity_path, f"id {record['id']!r} is also the id on line {first_line[record['id']]}",
                               line=line)
        first_line[record["id"]] = line
        images = record.get("images", [])
        if not all(isinstance(image, str) for image in images):
            raise MELDataError(entity_path, "images must be a list of paths", line=line, record_id=record["id"])
        _count_unknown_fields(record, JSONL_ENTITY_FIELDS, line, report.unknown_entity_fields)
        entities["id"].append(record["id"])
        entities["name"].append(record["name"])
        entities["description"].append(record["description"])
        entities["images"].append(_existing_entity_images(images, root, files, report))
    if not entities["id"]:
        raise MELDataError(entity_path, "no entities")
    _count_entities(entities, report)

    if splits is None:
        others = sorted(file for file in os.listdir(root) if file.endswith(".jsonl") and file != JSONL_ENTITY_FILE
                        and file[: -len(".jsonl")] not in SPLITS)
        splits = [split for split in SPLITS if os.path.isfile(os.path.join(root, f"{split}.jsonl"))]
        report.missing_splits = {split: _looked_for(root, split) for split in SPLITS if split not in splits}
        report.ignored_files = others
        if not splits:
            found = f"; found {', '.join(others)}" if others else ""
            raise MELDataError(root, f"no split files: expected {{split}}.jsonl files next to {JSONL_ENTITY_FILE} "
                               f"(train.jsonl, dev.jsonl, test.jsonl){found}")
    loaded = {}
    for split in splits:
        path = os.path.join(root, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise MissingSplitError(root, f"split {split!r} is missing: {_looked_for(root, split)}")
        counts = report.splits[split] = MELSplitReport(file=path)
        mentions = {key: [] for key in MENTION_FEATURES}
        for line, record in _read_jsonl(path):
            _check_fields(path, None, record, {"mention": str, "sentence": str, "answer": (str, type(None))},
                          line=line, optional={"image": (str, type(None))})
            _count_unknown_fields(record, JSONL_MENTION_FIELDS, line, counts.unknown_fields)
            if record["answer"] is None or record["answer"] == NIL_ANSWER:
                counts.nil_dropped += 1
                continue
            if record["answer"] not in first_line:
                raise MELDataError(path, f"answer {record['answer']!r} is not an entity id of {JSONL_ENTITY_FILE}",
                                   line=line, record_id=_record_id(record))
            image = record.get("image")
            mentions["mention"].append(record["mention"])
            mentions["sentence"].append(record["sentence"])
            mentions["image"].append(_existing_image(os.path.join(root, image), files, counts) if image else None)
            mentions["answer"].append(record["answer"])
        loaded[split] = _finish_split(mentions, counts)
    entity_dataset = datasets.Dataset.from_dict(entities, features=ENTITY_FEATURES)
    return MELBenchmark(name or os.path.basename(root), root, "jsonl", entity_dataset, loaded, report)


def _looked_for(root: str, split: str) -> str:
    """What was looked for in place of a missing JSON Lines split, with the near misses present (`validation.jsonl`)."""
    expected = f"{split}.jsonl"
    names = (split, *SPLIT_NEAR_MISSES.get(split, ()))
    near = sorted(file for file in os.listdir(root) if file != expected and os.path.splitext(file)[0].lower() in names
                  and os.path.splitext(file)[1].lower() in (".jsonl", ".json"))
    if not near:
        return f"looked for {expected}"
    which = "it" if len(near) == 1 else "one of them"
    return (f"looked for {expected}; found {' and '.join(near)}: rename {which} to {expected} to use it as the "
            f"{split} split")


def _count_unknown_fields(record: dict, known: Sequence[str], line: int, fields: dict[str, tuple[int, int]]) -> None:
    for key in record:
        if key not in known:
            first, records = fields.get(key, (line, 0))
            fields[key] = (first, records + 1)


def _record_id(record: dict):
    return record.get("id") if isinstance(record.get("id"), (str, int)) else None


# ----------------------------------------------------------------------------------------------- load helpers


class _FileIndex:
    """Existence checks against one directory listing per folder (a stat per file is slow on network disks)."""

    def __init__(self):
        self._listings: dict[str, set[str]] = {}

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        if folder not in self._listings:
            try:
                self._listings[folder] = {entry.name for entry in os.scandir(folder) if entry.is_file()}
            except OSError:
                self._listings[folder] = set()
        return name in self._listings[folder]


def _existing_entity_images(images: list[str], folder: str, files: _FileIndex, report: MELReport) -> list[str]:
    kept = []
    for image in images:
        path = os.path.normpath(os.path.join(folder, image))
        if files.exists(path):
            kept.append(path)
        else:
            report.missing_entity_images += 1
            if len(report.missing_entity_image_examples) < MISSING_EXAMPLES:
                report.missing_entity_image_examples.append(path)
    return kept


def _existing_image(path: str, files: _FileIndex, counts: MELSplitReport) -> str | None:
    path = os.path.normpath(path)
    if files.exists(path):
        return path
    counts.missing_images += 1
    if len(counts.missing_image_examples) < MISSING_EXAMPLES:
        counts.missing_image_examples.append(path)
    return None


def _count_entities(entities: dict[str, list], report: MELReport) -> None:
    report.entities = len(entities["id"])
    report.entities_without_images = sum(not images for images in entities["images"])


def _finish_split(mentions: dict[str, list], counts: MELSplitReport) -> datasets.Dataset:
    counts.mentions = len(mentions["mention"])
    counts.without_image = sum(image is None for image in mentions["image"])
    return datasets.Dataset.from_dict(mentions, features=MENTION_FEATURES)


def _benchmark_split_files(root: str, name: str | None, splits: tuple[str, ...]):
    """The dataset's name and split -> file path, from the split files present (or for the name given)."""
    if not os.path.isdir(root):
        raise MELDataError(root, "no such folder")
    if name is None:
        present = [dataset for dataset, prefixes in BENCHMARK_SPLIT_PREFIXES.items()
                   if any(os.path.isfile(os.path.join(root, f"{prefix}_{split}.json"))
                          for prefix in prefixes for split in SPLITS)]
        if len(present) != 1:
            looked = ", ".join(f"{prefix}_{{train,dev,test}}.json"
                               for prefixes in BENCHMARK_SPLIT_PREFIXES.values() for prefix in prefixes)
            if not present and not splits:  # the KB alone, asked for as such: named after its folder
                return os.path.basename(os.path.abspath(root)), {}, []
            if not present:  # (a KB without split files: each split asked for is missing)
                raise MissingSplitError(root, f"no split files; looked for {looked}; pass name= to choose")
            raise MELDataError(root, f"split files of several datasets ({', '.join(present)}); looked for {looked}; "
                               "pass name= to choose")
        name = present[0]
    else:
        known = {key.lower(): dataset for dataset, prefixes in BENCHMARK_SPLIT_PREFIXES.items()
                 for key in (dataset, *prefixes)}
        if name.lower() not in known:
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARK_SPLIT_PREFIXES)}")
        name = known[name.lower()]
    files, notes = {}, []
    for split in splits:
        candidates = [f"{prefix}_{split}.json" for prefix in BENCHMARK_SPLIT_PREFIXES[name]]
        found = [file for file in candidates if os.path.isfile(os.path.join(root, file))]
        if not found:
            raise MissingSplitError(root, f"{name} split {split!r} is missing: looked for {' and '.join(candidates)}")
        if len(found) > 1:
            notes.append(f"both {' and '.join(found)} exist; read {found[0]}")
        files[split] = os.path.join(root, found[0])
    return name, files, notes


def _read_json(path: str, expected_type: type):
    try:
        with open(path, encoding="utf-8-sig") as file:
            data = json.load(file)
    except FileNotFoundError:
        raise MELDataError(path, "no such file") from None
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except json.JSONDecodeError as error:
        raise MELDataError(path, f"invalid JSON: {error.msg}", line=error.lineno, column=error.colno) from None
    if not isinstance(data, expected_type):
        kind = "a list" if expected_type is list else "an object"
        raise MELDataError(path, f"must hold {kind}, got {type(data).__name__}")
    return data


def _read_qid2id(path: str) -> dict[str, int]:
    # One JSON object (the authors read it with json.loads(f.readline())); a pretty-printed file reads the same.
    qid2id = _read_json(path, dict)
    for qid, entity_id in qid2id.items():
        if not isinstance(entity_id, int) or isinstance(entity_id, bool):
            raise MELDataError(path, f"{qid!r} maps to {entity_id!r}; ids must be integers")
    return qid2id


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line."""
    try:
        file = open(path, encoding="utf-8-sig")
    except FileNotFoundError:
        raise MELDataError(path, "no such file") from None
    with file:
        for line_number, line in _numbered_lines(file, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise MELDataError(path, f"invalid JSON: {error.msg}", line=line_number, column=error.colno) from None
            if not isinstance(record, dict):
                raise MELDataError(path, f"must be a JSON object, got {type(record).__name__}", line=line_number)
            yield line_number, record


def _numbered_lines(file, path: str) -> Iterator[tuple[int, str]]:
    try:
        yield from enumerate(file, start=1)
    except UnicodeDecodeError:  # the text layer decodes in chunks: its position is no line; find it in the bytes
        raise _not_utf8(path) from None


def _not_utf8(path: str) -> MELDataError:
    """The error for a file that is not UTF-8, naming the first line, and the byte offset, that does not decode."""
    offset = 0
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):  # a UTF-8 sequence never holds the byte of a line break
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return MELDataError(path, f"not UTF-8: byte 0x{line[error.start]:02x} at byte offset "
                                    f"{offset + error.start} of the file ({error.reason}); save the file as UTF-8",
                                    line=line_number)
            offset += len(line)
    return MELDataError(path, "not UTF-8; save the file as UTF-8")


def _check_fields(path: str, index: int | None, record, required: dict, line: int | None = None,
                  optional: dict | None = None) -> None:
    """Every required field present with its type, every optional one of its type when present."""
    if not isinstance(record, dict):
        raise MELDataError(path, f"must be a JSON object, got {type(record).__name__}", record=index, line=line)
    record_id = _record_id(record)
    for key, kind in {**required, **(optional or {})}.items():
        if key not in record:
            if key in required:
                raise MELDataError(path, f"missing field {key!r}", record=index, record_id=record_id, line=line)
            continue
        value = record[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = " or ".join(_TYPE_NAMES[k] for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise MELDataError(path, f"field {key!r} must be {names}, got {json.dumps(value)[:80]}", record=index,
                               record_id=record_id, line=line)


_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", type(None): "null"}


# ------------------------------------------------------------------------------------------------- batches


def entity_image(images: Sequence[str], training: bool, generator: torch.Generator | None = None) -> str | None:
    """A random one of the entity's images in training, the first one in evaluation; None without images."""
    if not images:
        return None
    if not training:
        return images[0]
    return images[int(torch.randint(len(images), (1,), generator=generator))]


def process_mention_rows(processor, rows) -> BatchFeature:
    """Mention rows (a `Dataset` batch, or a list of row dicts) -> `processor.process_mentions` inputs."""
    rows = _columns(rows, ("mention", "sentence", "image"))
    return processor.process_mentions(rows["mention"], rows["sentence"], rows["image"])


def process_entity_rows(processor, rows, *, training: bool, generator: torch.Generator | None = None,
                        seeds: Sequence[int] | None = None) -> BatchFeature:
    """
    Entity rows -> `processor.process_entities` inputs, one image each (`entity_image`). In training, `seeds` (one
    per row) draw each row's image with its own generator, so a row's draw does not depend on the other rows of the
    batch (the same mention gets the same image however the batch is split across processes).
    """
    rows = _columns(rows, ("name", "description", "images"))
    if seeds is not None:
        if len(seeds) != len(rows["images"]):
            raise ValueError(f"got {len(seeds)} seeds for {len(rows['images'])} entities")
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    else:
        generators = [generator] * len(rows["images"])
    images = [entity_image(paths, training, g) for paths, g in zip(rows["images"], generators)]
    return processor.process_entities(rows["name"], rows["description"], images)


def process_training_batch(processor, mention_rows, gold_entity_rows, generator: torch.Generator | None = None,
                           seeds: Sequence[int] | None = None) -> BatchFeature:
    """
    An aligned training batch (entity `i` is the gold entity of mention `i`) for `M3ELModel(**batch, return_loss=True)`:
    mention keys, and entity keys prefixed with `entity_`; each entity shows a random one of its images.
    `generator=None` draws from torch's global generator; `seeds` (one per row) seed each row's draw instead.
    """
    mentions = process_mention_rows(processor, mention_rows)
    entities = process_entity_rows(processor, gold_entity_rows, training=True, generator=generator, seeds=seeds)
    if len(entities["input_ids"]) != len(mentions["input_ids"]):
        raise ValueError(f"got {len(mentions['input_ids'])} mentions but {len(entities['input_ids'])} gold entities")
    return BatchFeature({**mentions, **{f"entity_{key}": value for key, value in entities.items()}})


def _columns(rows, keys: tuple[str, ...]) -> dict[str, list]:
    """A `Dataset` batch (dict of lists) or a list of row dicts -> dict of lists with `keys`."""
    if isinstance(rows, Mapping):
        return {key: list(rows[key]) for key in keys}
    return {key: [row[key] for row in rows] for key in keys}


class UniqueGoldBatchSampler(torch.utils.data.Sampler):
    """
    Batches of mention indices in which no gold entity appears twice: with in-batch negatives, a second mention of
    the same entity would make that entity a negative of its own mention (a false negative). Shuffled each epoch
    (`set_epoch`), deterministic given `seed` and the epoch (the same plan on every process), every mention at most
    once per epoch.

    Without `drop_last` every mention is in exactly one batch; the batches are full except the last ones of the
    epoch, which are short when too few different gold entities are left to fill them.

    With `drop_last` every batch is full, and there are as many as can be: the largest `b` such that the golds'
    mention counts, each capped at `b`, add up to `b * batch_size` or more (an entity can be in each of `b` batches
    once). `b` is the same every epoch (`len`). `left_out` mentions (`len(answers) - b * batch_size`, the fewest
    possible) are in none of the epoch's batches: of an entity with more than `b` mentions, all but `b` of them, and
    as many others as it takes to leave exactly `b * batch_size`; which ones is drawn at random each epoch. So other
    mentions are left out each epoch, but as many: the more the answers are concentrated on few entities, and the
    larger the batch, the more they tend to be.

    Args:
        answers (`Sequence[Hashable]`): the gold entity id of each mention (e.g. `benchmark.splits["train"]["answer"]`).
        batch_size (`int`): mentions per batch.
        seed (`int`, *optional*, defaults to 0): the shuffle's seed (the same on every process).
        drop_last (`bool`, *optional*, defaults to `False`): only full batches, as many as can be (see above).
    """

    def __init__(self, answers: Sequence[Hashable], batch_size: int, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.answers = list(answers)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        # Each gold as a number, in order of first appearance (the same on every process), and its mention count.
        numbers: dict[Hashable, int] = {}
        self._golds = np.fromiter(
            (numbers.setdefault(gold, len(numbers)) for gold in self.answers), dtype=np.int64, count=len(self.answers)
        )
        self._full_batches = self.most_full_batches(np.bincount(self._golds, minlength=len(numbers)), batch_size)

    @staticmethod
    def most_full_batches(counts: Sequence[int], batch_size: int) -> int:
        """The most full batches of `batch_size` mentions with distinct golds, for golds with these mention counts:
        the largest `b` with `sum(min(count, b) for count in counts) >= b * batch_size`."""
        counts = np.sort(np.asarray(counts, dtype=np.int64))
        candidates = np.arange(int(counts.sum()) // batch_size + 1)
        below = np.searchsorted(counts, candidates)  # golds with fewer mentions than the candidate b
        capped = np.concatenate([[0], np.cumsum(counts)])[below] + candidates * (len(counts) - below)
        return int(np.flatnonzero(capped >= candidates * batch_size)[-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return self._full_batches if self.drop_last else len(self._batches())

    @property
    def left_out(self) -> int:
        """Mentions in none of this epoch's batches (none without `drop_last`; with it, as many every epoch)."""
        if self.drop_last:
            return len(self.answers) - self._full_batches * self.batch_size
        return len(self.answers) - sum(len(batch) for batch in self._batches())

    def _batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = self._full_plan(rng) if self.drop_last else self._greedy_plan(rng)
        self._plan = (self.epoch, batches)
        return batches

    def _full_plan(self, rng: np.random.Generator) -> list[list[int]]:
        # The b full batches. Take at most b mentions of each gold (drawn at random), then drop mentions at random
        # until b * batch_size remain (the count of b allows it), and list them grouped by gold, the golds in a
        # random order. Cut the list into batch_size rows of b: each batch takes one mention of every row, the
        # columns of a row going to the b batches in a random order. A gold's mentions are at most b consecutive
        # places of the list: in one row (distinct columns, so distinct batches), or at the end of one row and the
        # start of the next, whose first columns then go to batches other than those of the previous row's last.
        size, count = self.batch_size, self._full_batches
        if count == 0:
            return []
        golds = self._golds
        shuffled = rng.permutation(len(golds))
        listed = shuffled[np.argsort(rng.permutation(golds.max() + 1)[golds[shuffled]], kind="stable")]
        starts = np.flatnonzero(np.concatenate([[True], golds[listed[1:]] != golds[listed[:-1]]]))
        rank = np.arange(len(listed)) - np.repeat(starts, np.diff(np.append(starts, len(listed))))
        kept = listed[rank < count]  # (still grouped by gold)
        if len(kept) > count * size:
            dropped = np.zeros(len(kept), dtype=bool)
            dropped[rng.choice(len(kept), len(kept) - count * size, replace=False)] = True
            kept = kept[~dropped]
        kept_golds = golds[kept]
        starts = np.flatnonzero(np.concatenate([[True], kept_golds[1:] != kept_golds[:-1]]))
        ends = np.append(starts[1:], len(kept))
        group = np.repeat(np.arange(len(starts)), ends - starts)
        columns = np.empty((size, count), dtype=np.int64)  # row -> column -> batch
        columns[0] = rng.permutation(count)
        for row in range(1, size):
            place = row * count
            first = group[place]
            if starts[first] == place:  # no gold across the two rows
                columns[row] = rng.permutation(count)
                continue
            tail, head = place - starts[first], ends[first] - place  # its places in the previous row, in this one
            previous = columns[row - 1]
            free = rng.permutation(previous[: count - tail])  # batches without that gold
            rest = rng.permutation(np.concatenate([free[head:], previous[-tail:]]))
            columns[row] = np.concatenate([free[:head], rest])
        plan = np.empty((count, size), dtype=np.int64)
        plan[columns.ravel(), np.repeat(np.arange(size), count)] = kept
        return rng.permuted(plan, axis=1).tolist()  # (the batches' order is random: that of row 0's columns)

    def _greedy_plan(self, rng: np.random.Generator) -> list[list[int]]:
        order = rng.permutation(len(self.answers)).tolist()
        # Greedy over the shuffled order. A mention whose gold is already in the batch being filled waits, queued
        # under its gold; golds wait in the order they first had to. Each new batch first takes one waiting mention
        # of every waiting gold (oldest gold first; their golds are distinct), then continues the shuffled order.
        # So a mention waits at most until the next batch without its gold, the copies of a frequent gold are
        # spread one per batch, and every mention is placed exactly once. A batch closes short only when the order
        # is used up and fewer distinct golds wait than it has room for: only at the end of the epoch.
        waiting: dict[Hashable, deque[int]] = {}
        batches, position = [], 0
        while position < len(order) or waiting:
            batch, golds = [], set()
            for gold in list(waiting):
                if len(batch) == self.batch_size:
                    break
                batch.append(waiting[gold].popleft())
                golds.add(gold)
                if not waiting[gold]:
                    del waiting[gold]
            while len(batch) < self.batch_size and position < len(order):
                index = order[position]
                position += 1
                gold = self.answers[index]
                if gold in golds:
                    waiting.setdefault(gold, deque()).append(index)
                else:
                    batch.append(index)
                    golds.add(gold)
            batches.append(batch)
        return batches


__all__ = [
    "MELBenchmark",
    "MELDataError",
    "MELReport",
    "MELSplitReport",
    "MissingSplitError",
    "UniqueGoldBatchSampler",
    "entity_image",
    "load_benchmark",
    "load_jsonl_benchmark",
    "load_mimic_benchmark",
    "process_entity_rows",
    "process_mention_rows",
    "process_training_batch",
]
