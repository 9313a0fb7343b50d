"""A built-in demo benchmark in the release layout, generated from a seed: small, and needing text and image together.

Every entity has a text identity, a name and a sense (`"Jaguar"`, `animal`), and a visual identity, a coloured shape
on a grey textured background (`red circle on stripes`); its name and description state both. Each (name, sense) is
shared by several entities that differ only by the colour of their shape, and each visual identity is drawn by
entities of other names and senses. A mention's sentence gives the name and clue words of the sense, never the
colour; its image is a fresh rendering of the gold entity's visual identity. So the text alone leaves the entities of
one (name, sense), the image alone the entities drawn alike, and only both together leave the gold entity.

    folder = write_demo_benchmark("demo")          # WIKIMEL_{train,dev,test}.json, kb_entity.json, qid2id.json, images
    benchmark = load_benchmark(folder)             # modeling_m3el.data
    processor = demo_processor()                   # a tiny CLIP tokenizer: one token per demo word, 32x32 images

The data carries the dirt of the real releases: entities and mentions without images, listed images whose files
are missing, `nil` answers, a PNG under a `.jpg` name, a grayscale image, an entity with `attr` instead of `desc`,
a percent-encoded name, kb ids out of order, mention image paths with other extensions than the jpg on disk.
"""

import json
import os
import shutil
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np
from PIL import Image, ImageDraw

from .model_card import DEMO_MANIFEST
from .processing_m3el import M3ELProcessor
from .tiny import tiny_processor

DEMO_VERSION = 1  # bump when the generated files change for a given seed and sizes
DEMO_PREFIX = "WIKIMEL"  # split file names the loader resolves (WIKIMEL_train.json)

# Ambiguous names; each takes `senses` of the domains below. The last one is stored percent-encoded, as in WikiMEL.
NAMES = ("Jaguar", "Mercury", "Phoenix", "Apollo", "Atlas", "Orion", "Falcon", "Titan", "Cobra", "Amazon",
         "Saturn", "Mustang", "Raven", "Condor", "Lynx", "Viper", "Hermes", "Aurora", "Nova", "Iron%20Horse")
# Sense -> its clue words: a mention's sentence carries one or two of them, the entity's description all three.
DOMAINS = {
    "animal": ("forest", "wild", "zoo"),
    "car": ("road", "engine", "drive"),
    "team": ("match", "league", "fans"),
    "band": ("song", "album", "stage"),
    "river": ("water", "valley", "bridge"),
    "planet": ("orbit", "sky", "telescope"),
    "ship": ("sea", "harbor", "crew"),
    "city": ("street", "mayor", "market"),
    "film": ("movie", "actor", "cinema"),
    "game": ("level", "player", "console"),
}
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (225, 205, 40),
    "purple": (140, 60, 180),
    "orange": (235, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
TEXTURES = ("stripes", "dots", "checks")

# Short, like the releases' descriptions ("American media personality"): 10 words.
ENTITY_TEMPLATE = "{colour} {shape} on {texture} {domain} of {clue} {other} and {third}"
MENTION_TEMPLATES = (
    "we saw the {name} near the {clue} today",
    "photo of {name} with {clue} and {other}",
    "people talk about the {name} and its {clue}",
    "the {name} {domain} at the {clue} this {time}",
    "news about {name} from the {clue} last {time}",
    "look at this {name} by the {clue} and {other}",
)
TIMES = ("morning", "night", "weekend", "week", "summer")

IMAGE_SIZE = 64  # pixels on disk; the processor resizes (32 for the tiny model, 224 for ViT-B/32)


def _words(text: str) -> set[str]:
    plain = text
    for slot in ("{colour}", "{name}", "{domain}", "{shape}", "{texture}", "{clue}", "{other}", "{third}", "{time}"):
        plain = plain.replace(slot, " ")
    return {word for word in plain.split() if len(word) > 1}


# Every word of every demo text (lower case; `sep` for the " [SEP] " separator), for `tiny_tokenizer(DEMO_WORDS)` to
# make each one token, so that a demo text takes one token per word.
DEMO_WORDS = tuple(sorted(
    {"sep"}
    | {word for name in NAMES for word in unquote(name).lower().split()}
    | set(DOMAINS) | {clue for clues in DOMAINS.values() for clue in clues}
    | set(COLOURS) | set(SHAPES) | set(TEXTURES) | set(TIMES)
    | _words(ENTITY_TEMPLATE) | {word for template in MENTION_TEMPLATES for word in _words(template)}
))


@dataclass(frozen=True)
class DemoEntity:
    """One KB entity of the demo, with the identities its texts and images are generated from."""

    qid: str
    kb_id: int  # the release's integer id (qid2id.json)
    name: str  # as stored in the KB (percent-encoded where it has a space)
    domain: str  # its sense
    colour: str
    shape: str
    texture: str

    @property
    def text_identity(self) -> tuple[str, str]:
        """What a mention's text reveals: the name and the sense."""
        return self.name, self.domain

    @property
    def visual_identity(self) -> tuple[str, str, str]:
        """What a mention's image reveals."""
        return self.shape, self.texture, self.colour

    @property
    def base_pattern(self) -> tuple[str, str]:
        """Shared by all the entities of one (name, sense): they differ only by colour."""
        return self.shape, self.texture


def demo_entities(seed: int = 0, num_names: int = 20, senses: int = 2, colours_per_sense: int = 4) -> list[DemoEntity]:
    """The demo KB's design: `num_names * senses * colours_per_sense` entities (160 by default)."""
    if not 1 <= num_names <= len(NAMES):
        raise ValueError(f"num_names must be in 1..{len(NAMES)}, got {num_names}")
    if not 1 <= senses <= len(DOMAINS):
        raise ValueError(f"senses must be in 1..{len(DOMAINS)}, got {senses}")
    if not 1 <= colours_per_sense <= len(COLOURS):
        raise ValueError(f"colours_per_sense must be in 1..{len(COLOURS)}, got {colours_per_sense}")
    rng = np.random.default_rng([seed, 0])
    domains, colours = list(DOMAINS), list(COLOURS)
    groups = [(name, domains[d]) for name in NAMES[:num_names] for d in sorted(rng.choice(len(domains), senses, False))]
    # Base patterns dealt round the groups in shuffled rounds, so each one is shared by about the same number of
    # groups; with colours drawn per group, most visual identities recur under other names and senses.
    patterns = [(shape, texture) for shape in SHAPES for texture in TEXTURES]
    dealt = [patterns[i] for _ in range(-(-len(groups) // len(patterns))) for i in rng.permutation(len(patterns))]
    designs = [(name, domain, colours[c], *dealt[g])
               for g, (name, domain) in enumerate(groups)
               for c in sorted(rng.choice(len(colours), colours_per_sense, False))]
    qids = rng.choice(np.arange(100, 100_000), len(designs), replace=False)
    kb_ids = rng.permutation(len(designs))  # written out of id order: the loader sorts, as the authors' code did
    return [DemoEntity(f"Q{qid}", int(kb_id), name, domain, colour, shape, texture)
            for (name, domain, colour, shape, texture), qid, kb_id in zip(designs, qids, kb_ids)]


def entity_description(entity: DemoEntity) -> str:
    clues = DOMAINS[entity.domain]
    return ENTITY_TEMPLATE.format(colour=entity.colour, shape=entity.shape, texture=entity.texture,
                                  domain=entity.domain, clue=clues[0], other=clues[1], third=clues[2])


def render_demo_image(shape: str, texture: str, colour: str, rng: np.random.Generator, size: int = IMAGE_SIZE
                      ) -> Image.Image:
    """A coloured shape on a grey texture, with random placement, size, rotation, shade and noise."""
    y, x = np.mgrid[0:size, 0:size]
    period, phase = int(rng.integers(8, 13)), int(rng.integers(0, 12))
    if texture == "stripes":
        on = (x + y + phase) % period < period // 2
    elif texture == "checks":
        on = ((x + phase) // (period // 2 + 2) + (y + phase) // (period // 2 + 2)) % 2 == 0
    elif texture == "dots":
        on = ((x + phase) % period - period / 2) ** 2 + ((y + phase) % period - period / 2) ** 2 < (period / 3.5) ** 2
    else:
        raise ValueError(f"unknown texture {texture!r}")
    grey = np.where(on, rng.integers(50, 100), rng.integers(150, 205)).astype(np.uint8)
    image = Image.fromarray(np.stack([grey] * 3, axis=-1))

    centre = size / 2 + rng.uniform(-0.12, 0.12, size=2) * size
    radius = rng.uniform(0.24, 0.32) * size
    angle = rng.uniform(-0.35, 0.35)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255))
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse([*(centre - radius), *(centre + radius)], fill=fill)
    else:
        if shape == "square":
            corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
            scale = radius / np.sqrt(2)
        elif shape == "triangle":
            corners = [(0, -1), (0.866, 0.5), (-0.866, 0.5)]
            scale = radius
        elif shape == "cross":
            arm = 0.35
            corners = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1), (-arm, 1),
                       (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]
            scale = radius
        else:
            raise ValueError(f"unknown shape {shape!r}")
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        points = np.array(corners) @ rotation.T * scale + centre
        draw.polygon([tuple(point) for point in points.tolist()], fill=fill)
    noisy = np.asarray(image, dtype=np.float64) + rng.normal(0, 5, size=(size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _save(image: Image.Image, path: str, image_format: str = "JPEG") -> None:
    image.save(path, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))


def _write_json(path: str, data, indent: int | None = 1) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(json.dumps(data, ensure_ascii=False, indent=indent) + "\n")


def _demo_files(folder: str) -> list[str]:
    splits = [f"{DEMO_PREFIX}_{split}.json" for split in ("train", "dev", "test")]
    names = ("kb_entity.json", "qid2id.json", "kb_image", "mention_image", *splits)
    return [os.path.join(folder, name) for name in names]


def write_demo_benchmark(folder, seed: int = 0, *, num_names: int = 20, senses: int = 2, colours_per_sense: int = 4,
                         train: int = 1500, dev: int = 300, test: int = 300) -> str:
    """
    Write the demo benchmark into `folder` (created if needed) in the release layout, and return its path.

    The files depend only on `seed` and the sizes, byte for byte. A folder that already holds this demo (its
    `demo_manifest.json` says so) is reused as it is; the files of another or an interrupted demo are rewritten;
    a folder holding other files and no demo is refused. Run it on one process (`main_process_first`).
    """
    for split, count in (("train", train), ("dev", dev), ("test", test)):
        if count < 10:
            raise ValueError(f"{split} must have at least 10 mentions, got {count}")
    entities = demo_entities(seed, num_names, senses, colours_per_sense)
    if len(entities) < 5:
        raise ValueError(f"the demo needs at least 5 entities, got {len(entities)}")
    folder = os.path.abspath(folder)
    params = {"seed": seed, "num_names": num_names, "senses": senses, "colours_per_sense": colours_per_sense,
              "train": train, "dev": dev, "test": test}
    manifest_path = os.path.join(folder, DEMO_MANIFEST)
    if os.path.isfile(manifest_path):
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
        if manifest.get("version") == DEMO_VERSION and manifest.get("params") == params:
            return folder
    elif os.path.isdir(folder):
        ours = {os.path.basename(path) for path in _demo_files(folder)}
        if set(os.listdir(folder)) - ours:  # demo files without a manifest: an interrupted run, rewritten below
            raise FileExistsError(f"{folder} holds other files than a demo; give an empty or new folder")
    for path in [manifest_path, *_demo_files(folder)]:  # manifest first: a half-written folder is never reused
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)

    counts = _write_kb(folder, entities, np.random.default_rng([seed, 1]))
    counts["splits"] = {}
    for index, (split, count) in enumerate((("train", train), ("dev", dev), ("test", test))):
        counts["splits"][split] = _write_mentions(folder, split, count, entities,
                                                  np.random.default_rng([seed, 2 + index]), with_png=split == "train")
    # Written last: its presence means the folder is complete.
    _write_json(manifest_path, {"generator": __name__, "version": DEMO_VERSION, "params": params, "counts": counts})
    return folder


def _write_kb(folder: str, entities: list[DemoEntity], rng: np.random.Generator) -> dict:
    image_folder = os.path.join(folder, "kb_image")
    os.makedirs(image_folder, exist_ok=True)
    picks = rng.permutation(len(entities)).tolist()
    without_images = set(picks[: max(1, len(entities) // 20)])
    attr_entity, grey_entity, lost_only, lost_one_of_many = picks[-1], picks[-2], picks[-3], picks[-4]
    records, missing, without = [], 0, 0
    for index, entity in enumerate(entities):
        count = 0 if index in without_images else int(rng.integers(1, 4))
        if index == lost_only:
            count = 1
        elif index == lost_one_of_many:
            count = 3
        image_list = []
        for k in range(count):
            extension = "png" if rng.random() < 0.1 else "jpg"
            file_name = f"{entity.qid}_{k}.{extension}"
            image_list.append(file_name)
            image = render_demo_image(entity.shape, entity.texture, entity.colour, rng)
            if (index == lost_only and k == 0) or (index == lost_one_of_many and k == 1):
                missing += 1  # listed, never written
                continue
            if index == grey_entity and k == 0:
                image = image.convert("L")
            _save(image, os.path.join(image_folder, file_name), "PNG" if extension == "png" else "JPEG")
        without += count == 0 or index == lost_only
        record = {"id": entity.kb_id, "entity_name": entity.name, "desc": entity_description(entity),
                  "image_list": image_list, "type": "entity"}
        if index == attr_entity:  # older releases
            record = {"id": entity.kb_id, "entity_name": entity.name, "attr": record["desc"],
                      "image_list": image_list, "type": "entity"}
        records.append(record)
    _write_json(os.path.join(folder, "kb_entity.json"), records)
    _write_json(os.path.join(folder, "qid2id.json"), {entity.qid: entity.kb_id for entity in entities}, indent=None)
    return {"entities": len(entities), "entities_without_images": without, "missing_entity_images": missing}


def _write_mentions(folder: str, split: str, count: int, entities: list[DemoEntity], rng: np.random.Generator,
                    with_png: bool) -> dict:
    image_folder = os.path.join(folder, "mention_image")
    os.makedirs(image_folder, exist_ok=True)
    picks = rng.permutation(count).tolist()
    num_nil, num_without, num_missing = max(1, count // 100), max(1, count // 20), max(1, count // 150)
    nil = set(picks[:num_nil])
    without_image = set(picks[num_nil : num_nil + num_without])
    missing = set(picks[num_nil + num_without : num_nil + num_without + num_missing])
    png = picks[num_nil + num_without + num_missing] if with_png else None
    records = []
    for index in range(count):
        mention_id = f"{split}-{index:05d}"
        entity = entities[int(rng.integers(len(entities)))]
        if index in nil:  # a name and a sense the KB knows, in a colour none of their entities has
            taken = {candidate.colour for candidate in entities if candidate.text_identity == entity.text_identity}
            free = [colour for colour in COLOURS if colour not in taken] or list(COLOURS)
            visual = (entity.shape, entity.texture, free[int(rng.integers(len(free)))])
        else:
            visual = entity.visual_identity
        clues = DOMAINS[entity.domain]
        clue, other = (clues[i] for i in rng.choice(len(clues), 2, replace=False))
        template = MENTION_TEMPLATES[int(rng.integers(len(MENTION_TEMPLATES)))]
        sentence = template.format(name=unquote(entity.name), domain=entity.domain, clue=clue, other=other,
                                   time=TIMES[int(rng.integers(len(TIMES)))])
        image = render_demo_image(*visual, rng)
        extension = ("jpg", "png", "jpeg")[int(rng.integers(3))]  # the release points at the original file
        image_path = "" if index in without_image else f"images/{mention_id}.{extension}"
        if image_path and index not in missing:
            # The loader looks for <base name>.jpg; one file is a PNG under that name, as in the release.
            _save(image, os.path.join(image_folder, f"{mention_id}.jpg"), "PNG" if index == png else "JPEG")
        records.append({"id": mention_id, "sentence": sentence, "mentions": entity.name,
                        "entities": "nil" if index in nil else entity.name, "imgPath": image_path,
                        "answer": "nil" if index in nil else entity.qid})
    _write_json(os.path.join(folder, f"{DEMO_PREFIX}_{split}.json"), records)
    return {"mentions": count - num_nil, "nil_dropped": num_nil, "without_image": num_without + num_missing,
            "missing_images": num_missing}


def demo_processor(image_size: int = 32, text_max_length: int = 40) -> M3ELProcessor:
    """The tiny processor for the demo: a tokenizer with one token per demo word, CLIP preprocessing at `image_size`."""
    return tiny_processor(words=DEMO_WORDS, image_size=image_size, text_max_length=text_max_length)


__all__ = [
    "DEMO_WORDS",
    "DemoEntity",
    "demo_entities",
    "demo_processor",
    "render_demo_image",
    "write_demo_benchmark",
]
