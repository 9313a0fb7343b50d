"""The built-in demo: deterministic, read by the benchmark loader with known counts, dirty like the releases, short
texts for the tiny tokenizer, and ambiguous in each modality alone."""

import json
import os
from collections import Counter
from urllib.parse import unquote

import pytest
from PIL import Image

from modeling_m3el.data import load_benchmark
from modeling_m3el.demo import (
    COLOURS,
    DEMO_WORDS,
    DOMAINS,
    SHAPES,
    TEXTURES,
    demo_entities,
    demo_processor,
    write_demo_benchmark,
)

SMALL = {"num_names": 3, "train": 20, "dev": 10, "test": 10}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return write_demo_benchmark(tmp_path_factory.mktemp("demo") / "default")


@pytest.fixture(scope="module")
def benchmark(demo_folder):
    return load_benchmark(demo_folder)


def folder_bytes(folder):
    files = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, folder)] = file.read()
    return files


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    first = folder_bytes(write_demo_benchmark(tmp_path / "a", seed=3, **SMALL))
    assert folder_bytes(write_demo_benchmark(tmp_path / "b", seed=3, **SMALL)) == first
    other = folder_bytes(write_demo_benchmark(tmp_path / "c", seed=4, **SMALL))
    assert other["kb_entity.json"] != first["kb_entity.json"]
    assert other["mention_image/train-00000.jpg"] != first["mention_image/train-00000.jpg"]


def test_existing_demo_is_reused_another_or_interrupted_rewritten_a_foreign_folder_refused(tmp_path):
    folder = write_demo_benchmark(tmp_path / "demo", seed=3, **SMALL)
    manifest = os.path.join(folder, "demo_manifest.json")
    stamp = os.stat(manifest).st_mtime_ns
    os.remove(os.path.join(folder, "kb_image", os.listdir(os.path.join(folder, "kb_image"))[0]))
    assert write_demo_benchmark(folder, seed=3, **SMALL) == folder
    assert os.stat(manifest).st_mtime_ns == stamp  # reused, not regenerated
    write_demo_benchmark(folder, seed=4, **SMALL)
    fresh = folder_bytes(write_demo_benchmark(tmp_path / "fresh", seed=4, **SMALL))
    assert folder_bytes(folder) == fresh
    os.remove(manifest)  # as if interrupted before the end
    write_demo_benchmark(folder, seed=4, **SMALL)
    assert folder_bytes(folder) == fresh
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds other files than a demo"):
        write_demo_benchmark(tmp_path / "mine")


def test_loader_counts_match_the_manifest(demo_folder, benchmark):
    with open(os.path.join(demo_folder, "demo_manifest.json")) as file:
        manifest = json.load(file)
    assert manifest["version"] == 1 and manifest["params"]["seed"] == 0
    counts = manifest["counts"]
    report = benchmark.report
    # written with WikiMEL's file names, it loads under its own name (what `m3el eval` and the card say), unless
    # another is asked for
    assert benchmark.name == "m3el-demo" and benchmark.summary().startswith("m3el-demo (mimic layout) at ")
    assert load_benchmark(demo_folder, splits=["test"], name="WikiMEL").name == "WikiMEL"
    assert (report.entities, report.entities_without_images, report.missing_entity_images) == (160, 9, 2)
    assert (counts["entities"], counts["entities_without_images"]) == (160, 9)
    assert counts["missing_entity_images"] == 2 and report.entities_without_qid == 0
    for split, expected in {"train": (1485, 15, 85, 10), "dev": (297, 3, 17, 2), "test": (297, 3, 17, 2)}.items():
        loaded = report.splits[split]
        assert (loaded.mentions, loaded.nil_dropped, loaded.without_image, loaded.missing_images) == expected
        assert tuple(counts["splits"][split].values()) == expected
        assert len(benchmark.splits[split]) == expected[0]


def test_dirt_of_the_releases_is_present(demo_folder, benchmark):
    with open(os.path.join(demo_folder, "kb_entity.json")) as file:
        records = json.load(file)
    assert [record["id"] for record in records] != sorted(record["id"] for record in records)
    with_attr = [record for record in records if "attr" in record]
    assert len(with_attr) == 1 and "desc" not in with_attr[0]
    row = benchmark.entity_index[next(e.qid for e in demo_entities() if e.kb_id == with_attr[0]["id"])]
    assert benchmark.entities[row]["description"] == with_attr[0]["attr"]
    assert any("%20" in name for name in benchmark.entities["name"])

    mention_images = [path for path in benchmark.splits["train"]["image"] if path]
    pngs = []
    for path in mention_images:
        with open(path, "rb") as file:
            if file.read(8) == PNG_SIGNATURE:
                pngs.append(path)
    assert len(pngs) == 1 and pngs[0].endswith(".jpg")
    with Image.open(pngs[0]) as image:
        assert image.format == "PNG" and image.size == (64, 64)
    modes = Counter()
    for paths in benchmark.entities["images"]:
        for path in paths:
            with Image.open(path) as image:
                modes[image.mode] += 1
    assert modes["L"] == 1 and modes["RGB"] > 200
    with open(os.path.join(demo_folder, "WIKIMEL_train.json")) as file:
        extensions = Counter(record["imgPath"].rsplit(".", 1)[-1] for record in json.load(file) if record["imgPath"])
    assert set(extensions) == {"jpg", "png", "jpeg"}  # the loader looks for <base name>.jpg whatever the path says


def demo_texts(benchmark, processor):
    texts = [processor.entity_text(row["name"], row["description"]) for row in benchmark.entities]
    for split in benchmark.splits.values():
        texts += [processor.mention_text(row["mention"], row["sentence"]) for row in split]
    return texts


def test_every_demo_text_fits_in_40_tokens(benchmark):
    processor = demo_processor()
    assert all(word.isalpha() and word.islower() for word in DEMO_WORDS)
    lengths = [len(ids) for ids in processor.tokenizer(demo_texts(benchmark, processor))["input_ids"]]
    assert len(lengths) == 160 + 1485 + 297 + 297 and max(lengths) <= 40


def test_every_demo_word_is_one_token(benchmark):
    processor = demo_processor()
    texts = demo_texts(benchmark, processor)
    lengths = [len(ids) for ids in processor.tokenizer(texts)["input_ids"]]
    # One token per word, three for " [SEP] " ("[", "sep", "]"), start and end.
    assert lengths == [len(text.replace("[SEP]", "[ sep ]").split()) + 2 for text in texts]
    assert max(lengths) <= 18


def test_text_alone_and_image_alone_are_ambiguous_together_they_are_not(benchmark):
    entities = demo_entities()
    by_qid = {entity.qid: entity for entity in entities}
    assert sorted(by_qid) == sorted(benchmark.entities["id"])
    visual_words = set(COLOURS) | set(SHAPES) | set(TEXTURES)
    names = Counter(entity.name for entity in entities)
    texts = Counter(entity.text_identity for entity in entities)
    visuals = Counter(entity.visual_identity for entity in entities)
    patterns = Counter(entity.base_pattern for entity in entities)
    test = benchmark.splits["test"]
    shared_name = shared_text = shared_visual = shared_pattern = 0
    for row in test:
        gold = by_qid[row["answer"]]
        words = set(row["sentence"].lower().split())
        assert not words & visual_words  # the text never tells the colour, shape or texture
        senses = [domain for domain, clues in DOMAINS.items() if words & set(clues)]
        assert senses == [gold.domain] and unquote(gold.name) in row["sentence"]
        shared_name += names[gold.name] > 1
        shared_text += texts[gold.text_identity] > 1
        shared_visual += visuals[gold.visual_identity] > 1
        shared_pattern += patterns[gold.base_pattern] > 1
        # Name, sense (from the clue) and visual identity together leave exactly the gold entity.
        matches = [e for e in entities if (e.name, e.domain, e.visual_identity) == (row["mention"], senses[0],
                                                                                       gold.visual_identity)]
        assert matches == [gold]
    assert shared_name == shared_text == shared_pattern == len(test)  # text alone: 4 candidates, always
    assert shared_visual >= 0.8 * len(test)  # image alone: several candidates, mostly
    # The descriptions state the visual identity, so an entity without images is still identifiable.
    for row in benchmark.entities:
        entity = by_qid[row["id"]]
        assert {entity.colour, entity.shape, entity.texture, entity.domain} <= set(row["description"].split())
