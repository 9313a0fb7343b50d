"""Data: the release layout and JSON Lines give exact rows, counts and clear errors; training batches; the sampler."""

import json
import os
import re
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_m3el.data import (
    MELDataError,
    UniqueGoldBatchSampler,
    entity_image,
    load_benchmark,
    load_jsonl_benchmark,
    load_mimic_benchmark,
    process_entity_rows,
    process_mention_rows,
    process_training_batch,
)
from modeling_m3el.tiny import tiny_processor

NOT_AN_IMAGE = b"these bytes are not an image"


def save_image(path, colour, image_format="JPEG"):
    Image.new("RGB", (20, 16), colour).save(path, format=image_format)


def write_json(path, data, indent=1):
    with open(path, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=indent)


def release_entities(text_field="desc"):
    """kb_entity.json records, out of id order as the release may hold them."""
    return [
        {"id": 2, "entity_name": "Paris%20Hilton", text_field: "American media personality",
         "image_list": ["hilton_0.jpg", "hilton_1.png"], "type": "entity"},
        {"id": 0, "entity_name": "Paris", text_field: "capital of France", "image_list": ["paris.jpg", "gone.jpg"],
         "type": "entity"},
        {"id": 1, "entity_name": "Hilton Hotels", text_field: "hotel chain", "image_list": [], "type": "entity"},
        {"id": 3, "entity_name": "Hotel", text_field: "a building", "image_list": ["broken.jpg"]},
    ]


def release_mentions():
    return {
        "train": [
            {"id": "m0", "sentence": "Paris at night", "mentions": "Paris", "entities": "Paris",
             "imgPath": "WikiMEL/images/m0.png", "answer": "Q90"},
            {"id": "m1", "sentence": "Paris Hilton arrives", "mentions": "Paris%20Hilton", "entities": "Paris Hilton",
             "imgPath": "", "answer": "Q20"},
            {"id": "m2", "sentence": "an unknown Paris", "mentions": "Paris", "entities": "nil",
             "imgPath": "m2.jpg", "answer": "nil"},
            {"id": "m3", "sentence": "the Hilton lobby", "mentions": "Hilton", "entities": "Hilton Hotels",
             "imgPath": "x/y/m3.jpeg", "answer": "Q30"},
            {"id": "m4", "sentence": "a hotel", "mentions": "hotel", "entities": "Hotel", "imgPath": "m4.jpg",
             "answer": "Q10"},
        ],
        "dev": [{"id": "d0", "sentence": "Hilton again", "mentions": "Hilton", "entities": "Hilton Hotels",
                 "imgPath": "d0.jpg", "answer": "Q30"}],
        "test": [
            {"id": "t0", "sentence": "who is Paris", "mentions": "Paris", "entities": "nil", "imgPath": "",
             "answer": "nil"},
            {"id": "t1", "sentence": "Paris in spring", "mentions": "Paris", "entities": "Paris", "imgPath": "t1.jpg",
             "answer": "Q10"},
        ],
    }


def write_release(root, prefix="WIKIMEL", text_field="desc", mention_folder="mention_image", qid2id_indent=None,
                  entities=None, mentions=None):
    """A small benchmark in the release layout. Q10 and Q90 both name entity 0; entity 3 has no QID."""
    os.makedirs(root / "kb_image")
    os.makedirs(root / mention_folder)
    write_json(root / "kb_entity.json", release_entities(text_field) if entities is None else entities)
    # The release writes qid2id on one line (the authors read json.loads(f.readline())); a pretty one reads the same.
    write_json(root / "qid2id.json", {"Q10": 0, "Q30": 1, "Q20": 2, "Q90": 0}, indent=qid2id_indent)
    for split, records in (release_mentions() if mentions is None else mentions).items():
        write_json(root / f"{prefix}_{split}.json", records)
    save_image(root / "kb_image" / "hilton_0.jpg", "red")
    save_image(root / "kb_image" / "hilton_1.png", "blue", "PNG")
    save_image(root / "kb_image" / "paris.jpg", "green")
    (root / "kb_image" / "broken.jpg").write_bytes(NOT_AN_IMAGE)
    save_image(root / mention_folder / "m0.jpg", "green", "PNG")  # converted to .jpg by name only, as in the release
    (root / mention_folder / "m4.jpg").write_bytes(NOT_AN_IMAGE)
    save_image(root / mention_folder / "d0.jpg", "yellow")
    save_image(root / mention_folder / "t1.jpg", "green")
    return root


@pytest.fixture
def release(tmp_path):
    return write_release(tmp_path / "bench")


# ------------------------------------------------------------------------------------------- release layout


@pytest.mark.parametrize("text_field", ["desc", "attr"])
@pytest.mark.parametrize("qid2id_indent", [None, 2])
def test_release_layout_rows_and_report(tmp_path, text_field, qid2id_indent):
    root = write_release(tmp_path / "bench", text_field=text_field, qid2id_indent=qid2id_indent)
    benchmark = load_mimic_benchmark(root)
    kb, mentions = str(root / "kb_image"), str(root / "mention_image")
    assert benchmark.name == "WikiMEL" and benchmark.layout == "mimic" and benchmark.root == str(root)
    # Sorted by the release's integer id; ids are QIDs (the first QID of an id), or the id itself without one.
    assert benchmark.entities.to_dict() == {
        "id": ["Q10", "Q30", "Q20", "3"],
        "name": ["Paris", "Hilton Hotels", "Paris%20Hilton", "Hotel"],
        "description": ["capital of France", "hotel chain", "American media personality", "a building"],
        "images": [[f"{kb}/paris.jpg"], [], [f"{kb}/hilton_0.jpg", f"{kb}/hilton_1.png"], [f"{kb}/broken.jpg"]],
    }
    assert benchmark.entity_index == {"Q10": 0, "Q30": 1, "Q20": 2, "3": 3}
    assert list(benchmark.splits) == ["train", "dev", "test"]
    assert benchmark.splits["train"].to_dict() == {
        "mention": ["Paris", "Paris%20Hilton", "Hilton", "hotel"],  # raw: the processor unquotes
        "sentence": ["Paris at night", "Paris Hilton arrives", "the Hilton lobby", "a hotel"],
        "image": [f"{mentions}/m0.jpg", None, None, f"{mentions}/m4.jpg"],  # broken m4 kept: the processor decides
        "answer": ["Q10", "Q20", "Q30", "Q10"],  # Q90 names entity 0, whose id is Q10
    }
    assert benchmark.splits["test"].to_dict() == {
        "mention": ["Paris"], "sentence": ["Paris in spring"], "image": [f"{mentions}/t1.jpg"], "answer": ["Q10"],
    }
    report = benchmark.report
    assert (report.entities, report.entities_without_images, report.missing_entity_images) == (4, 1, 1)
    assert report.missing_entity_image_examples == [f"{kb}/gone.jpg"]
    assert report.entities_without_qid == 1
    counts = {split: (c.mentions, c.nil_dropped, c.without_image, c.missing_images)
              for split, c in report.splits.items()}
    assert counts == {"train": (4, 1, 2, 1), "dev": (1, 0, 0, 0), "test": (1, 1, 0, 0)}
    assert report.splits["train"].missing_image_examples == [f"{mentions}/m3.jpg"]
    assert report.splits["train"].file == str(root / "WIKIMEL_train.json")
    summary = benchmark.summary()
    assert "4 entities, 1 without images, 1 missing image files" in summary
    assert "train (WIKIMEL_train.json): 4 mentions, 1 nil left out, 2 without image, 1 missing image files" in summary
    assert "m3.jpg" in summary and "1 without a QID" in summary


@pytest.mark.parametrize("prefix, mention_folder", [
    ("WikiDiverse", "mention_image"),
    ("wiki_diverse", "mention_images"),
])
def test_wikidiverse_file_names(tmp_path, prefix, mention_folder):
    root = write_release(tmp_path / "bench", prefix=prefix, mention_folder=mention_folder)
    benchmark = load_benchmark(root)
    assert benchmark.name == "WikiDiverse"
    assert benchmark.report.splits["dev"].file == str(root / f"{prefix}_dev.json")
    assert benchmark.splits["train"]["image"][0] == str(root / mention_folder / "m0.jpg")
    assert benchmark.report.splits["train"].missing_images == 1
    assert load_benchmark(root, name="wikidiverse").name == "WikiDiverse"


def test_without_a_mention_image_folder_every_mention_image_is_missing(release):
    os.rename(release / "mention_image", release / "elsewhere")
    benchmark = load_benchmark(release)
    assert benchmark.splits["train"]["image"] == [None] * 4
    counts = benchmark.report.splits["train"]
    assert (counts.without_image, counts.missing_images) == (4, 3)
    note = "no mention image folder (mention_image or mention_images): no mention has an image"
    assert benchmark.report.notes == [note]
    assert "note: no mention image folder" in benchmark.summary()


def test_name_argument_and_split_subset(release):
    os.remove(release / "WIKIMEL_train.json")
    benchmark = load_mimic_benchmark(release, name="WIKIMEL", splits=["test"])
    assert list(benchmark.splits) == ["test"] and benchmark.name == "WikiMEL"
    with pytest.raises(ValueError, match="unknown benchmark 'Wikipedia'"):
        load_mimic_benchmark(release, name="Wikipedia")


def test_unreadable_image_is_kept_and_the_processor_zero_fills_it_with_a_warning(release):
    benchmark = load_benchmark(release)
    processor = tiny_processor(words=("paris", "hilton", "hotel"))
    with pytest.warns(UserWarning, match=r"Unreadable image .*m4\.jpg"):
        inputs = process_mention_rows(processor, benchmark.splits["train"][:])
    assert inputs["has_image"].tolist() == [True, False, False, False]
    assert inputs["pixel_values"][3].abs().sum() == 0 and inputs["pixel_values"][0].abs().sum() > 0
    assert processor.num_unreadable_images == 1


def test_answer_missing_from_qid2id(tmp_path):
    mentions = release_mentions()
    mentions["train"][3]["answer"] = "Q404"
    root = write_release(tmp_path / "bench", mentions=mentions)
    with pytest.raises(MELDataError, match=r"WIKIMEL_train\.json, record 3 \(id 'm3'\): answer 'Q404' is not in "
                                           r"qid2id\.json"):
        load_benchmark(root)


def test_qid2id_id_without_entity(tmp_path):
    root = write_release(tmp_path / "bench")
    write_json(root / "qid2id.json", {"Q10": 0, "Q30": 1, "Q20": 2, "Q90": 7})
    with pytest.raises(MELDataError, match=r"WIKIMEL_train\.json, record 0 \(id 'm0'\): answer 'Q90' maps to id 7 "
                                           r"in qid2id\.json, which no entity of kb_entity\.json has"):
        load_benchmark(root)


def test_malformed_json_names_file_line_and_column(release):
    text = '[\n  {"id": 0, "entity_name": "Paris",}\n]\n'
    (release / "kb_entity.json").write_text(text)
    line = text.splitlines()[1]
    # Python's own message: 3.13 and newer point at the trailing comma, 3.11 and 3.12 at the brace after it
    if sys.version_info >= (3, 13):
        expected = rf"column {line.index(',}') + 1}: invalid JSON: Illegal trailing comma before end of object"
    else:
        expected = rf"column {line.index('}') + 1}: invalid JSON: Expecting property name"
    with pytest.raises(MELDataError, match=rf"kb_entity\.json, line 2, {expected}"):
        load_benchmark(release)
    (release / "qid2id.json").write_text('{"Q10": 0, "Q30" 1}')
    with pytest.raises(MELDataError, match=r"qid2id\.json, line 1, column 18: invalid JSON: Expecting ':'"):
        load_benchmark(release)


@pytest.mark.parametrize("prefix, looked_for", [
    ("WIKIMEL", "WIKIMEL_dev.json"),
    ("WikiDiverse", "WikiDiverse_dev.json and wiki_diverse_dev.json"),
])
def test_missing_split_names_folder_and_files(tmp_path, prefix, looked_for):
    root = write_release(tmp_path / "bench", prefix=prefix)
    os.remove(root / f"{prefix}_dev.json")
    with pytest.raises(MELDataError, match=rf"{re.escape(str(root))}: \w+ split 'dev' is missing: looked for "
                                           rf"{re.escape(looked_for)}"):
        load_benchmark(root)


def test_no_or_several_datasets_need_a_name(release):
    for split in ("train", "dev", "test"):
        os.rename(release / f"WIKIMEL_{split}.json", release / f"other_{split}.json")
    with pytest.raises(MELDataError, match=r"no split files; looked for WIKIMEL_\{train,dev,test\}\.json, .*name="):
        load_benchmark(release)
    os.rename(release / "other_test.json", release / "WIKIMEL_test.json")
    os.rename(release / "other_dev.json", release / "RichpediaMEL_dev.json")
    with pytest.raises(MELDataError, match=r"split files of several datasets \(WikiMEL, RichpediaMEL\)"):
        load_benchmark(release)
    assert list(load_benchmark(release, name="WikiMEL", splits=["test"]).splits) == ["test"]


@pytest.mark.parametrize("where, edit, message", [
    ("mention", lambda records: records[1].pop("imgPath"), r"WIKIMEL_train\.json, record 1 \(id 'm1'\): missing field "
                                                           r"'imgPath'"),
    ("mention", lambda records: records[2].update(answer=7), r"WIKIMEL_train\.json, record 2 \(id 'm2'\): field "
                                                             r"'answer' must be a string or null, got 7"),
    ("entity", lambda records: records[1].pop("desc"), r"kb_entity\.json, record 1 \(id 0\): needs a string field "
                                                       r"'desc' \(or 'attr'\)"),
    ("entity", lambda records: records[2].pop("entity_name"), r"kb_entity\.json, record 2 \(id 1\): missing field "
                                                              r"'entity_name'"),
    ("entity", lambda records: records[0].update(id="2"), r"kb_entity\.json, record 0 \(id '2'\): field 'id' must be "
                                                          r"an integer"),
    ("entity", lambda records: records[3].update(id=0), r"kb_entity\.json, record 3 \(id 0\): id 0 is also the id of "
                                                        r"record 1"),
    ("entity", lambda records: records[3].update(type="mention"), r"kb_entity\.json, record 3 \(id 3\): type "
                                                                  r"'mention' is not 'entity'"),
])
def test_record_errors_name_file_record_and_field(tmp_path, where, edit, message):
    entities, mentions = release_entities(), release_mentions()
    edit(mentions["train"] if where == "mention" else entities)
    root = write_release(tmp_path / "bench", entities=entities, mentions=mentions)
    with pytest.raises(MELDataError, match=message):
        load_benchmark(root)


def test_release_null_answer_is_nil_left_out_and_counted(tmp_path):
    mentions = release_mentions()
    mentions["test"][1]["answer"] = None  # t1, which linked Q10
    root = write_release(tmp_path / "bench", mentions=mentions)
    benchmark = load_benchmark(root)
    assert len(benchmark.splits["test"]) == 0
    assert benchmark.report.splits["test"].nil_dropped == 2  # t0's "nil" and t1's null
    assert "test (WIKIMEL_test.json): 0 mentions, 2 nil left out" in benchmark.summary()


def test_release_empty_kb(release):
    write_json(release / "kb_entity.json", [])
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(release / 'kb_entity.json'))}: no entities$"):
        load_benchmark(release)


@pytest.mark.parametrize("file, offset", [("kb_entity.json", 0), ("qid2id.json", 0), ("WIKIMEL_dev.json", 40)])
def test_release_file_not_utf8_names_file_line_and_byte(release, file, offset):
    data = (release / file).read_bytes()
    line = data[:offset].count(b"\n") + 1
    (release / file).write_bytes(data[:offset] + b"\xff" + data[offset + 1:])
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(release / file))}, line {line}: not UTF-8: byte 0xff at "
                                           rf"byte offset {offset} of the file \(invalid start byte\); save the file "
                                           r"as UTF-8$"):
        load_benchmark(release)


def test_folder_without_either_layout(tmp_path):
    with pytest.raises(MELDataError, match=r"no entities\.jsonl \(JSON Lines layout\) and no kb_entity\.json "
                                           r"\(release layout\)"):
        load_benchmark(tmp_path)


# ------------------------------------------------------------------------------------------------ JSON Lines


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def write_jsonl(root, entities=None, train=None):
    os.makedirs(root / "images")
    save_image(root / "images" / "tower.jpg", "red")
    save_image(root / "images" / "post.png", "blue", "PNG")
    (root / "images" / "broken.jpg").write_bytes(NOT_AN_IMAGE)
    write_lines(root / "entities.jsonl", entities or [
        {"id": "eiffel", "name": "Eiffel Tower", "description": "a tower", "images": ["images/tower.jpg"]},
        "",
        {"id": "paris", "name": "Paris", "description": "a city", "images": ["images/none.jpg", "images/broken.jpg"]},
        {"id": "hilton", "name": "Paris Hilton", "description": "a person"},
    ])
    write_lines(root / "train.jsonl", train or [
        {"mention": "tower", "sentence": "the tower at night", "image": "images/post.png", "answer": "eiffel"},
        {"mention": "Paris", "sentence": "Paris is", "image": None, "answer": None},
        {"mention": "Paris", "sentence": "in Paris", "answer": "paris"},
        {"mention": "Hilton", "sentence": "Hilton said", "image": "images/lost.jpg", "answer": "hilton"},
    ])
    write_lines(root / "test.jsonl", [{"mention": "Paris", "sentence": "Paris", "image": None, "answer": "paris"}])
    return root


def test_jsonl_rows_and_report(tmp_path):
    root = write_jsonl(tmp_path / "my_kb")
    benchmark = load_benchmark(root)
    assert benchmark.name == "my_kb" and benchmark.layout == "jsonl"
    assert benchmark.entities.to_dict() == {
        "id": ["eiffel", "paris", "hilton"],
        "name": ["Eiffel Tower", "Paris", "Paris Hilton"],
        "description": ["a tower", "a city", "a person"],
        "images": [[str(root / "images/tower.jpg")], [str(root / "images/broken.jpg")], []],
    }
    assert list(benchmark.splits) == ["train", "test"]  # train, dev, test first, in that order
    assert benchmark.splits["train"].to_dict() == {
        "mention": ["tower", "Paris", "Hilton"],
        "sentence": ["the tower at night", "in Paris", "Hilton said"],
        "image": [str(root / "images/post.png"), None, None],
        "answer": ["eiffel", "paris", "hilton"],
    }
    report = benchmark.report
    assert (report.entities, report.entities_without_images, report.missing_entity_images) == (3, 1, 1)
    assert report.missing_entity_image_examples == [str(root / "images/none.jpg")]
    train = report.splits["train"]
    assert (train.mentions, train.nil_dropped, train.without_image, train.missing_images) == (3, 1, 2, 1)
    assert train.missing_image_examples == [str(root / "images/lost.jpg")]
    assert list(load_jsonl_benchmark(root, splits=["test"], name="mine").splits) == ["test"]


@pytest.mark.parametrize("file, lines, message", [
    ("entities", ['{"id": "a", "name": "A", "description": "x"}', "", '{"id": "b", "name": }'],
     r"entities\.jsonl, line 3, column 21: invalid JSON: Expecting value"),
    ("entities", [{"id": 5, "name": "A", "description": "x"}],
     r"entities\.jsonl, line 1 \(id 5\): field 'id' must be a string, got 5"),
    ("entities", [{"id": "a", "name": "A"}], r"entities\.jsonl, line 1 \(id 'a'\): missing field 'description'"),
    ("entities", [{"id": "a", "name": "A", "description": "x"}, {"id": "a", "name": "B", "description": "y"}],
     r"entities\.jsonl, line 2: id 'a' is also the id on line 1"),
    ("entities", [["a", "A"]], r"entities\.jsonl, line 1: must be a JSON object, got list"),
    ("train", [{"mention": "a", "sentence": "s", "answer": "eiffel"}, {"mention": "a", "sentence": "s", "answer": "x"}],
     r"train\.jsonl, line 2: answer 'x' is not an entity id of entities\.jsonl"),
    ("train", [{"mention": "a", "answer": "eiffel"}], r"train\.jsonl, line 1: missing field 'sentence'"),
    ("train", [{"mention": "a", "sentence": "s"}], r"train\.jsonl, line 1: missing field 'answer'"),
    ("train", [{"mention": "a", "sentence": "s", "answer": "eiffel", "image": 3}],
     r"train\.jsonl, line 1: field 'image' must be a string or null, got 3"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, file, lines, message):
    root = write_jsonl(tmp_path / "kb", **{file: lines})
    with pytest.raises(MELDataError, match=message):
        load_benchmark(root)


def test_jsonl_empty_entities_file(tmp_path):
    root = write_jsonl(tmp_path / "kb")
    (root / "entities.jsonl").write_text("\n\n")
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(root / 'entities.jsonl'))}: no entities$"):
        load_benchmark(root)


def test_jsonl_nil_id_is_reserved(tmp_path):
    root = write_jsonl(tmp_path / "kb", entities=[{"id": "nil", "name": "Nil", "description": "x"}])
    with pytest.raises(MELDataError, match=r"entities\.jsonl, line 1 \(id 'nil'\): the id 'nil' is reserved: an answer "
                                           r"'nil' means that the mention's entity is not in the KB"):
        load_benchmark(root)


def test_jsonl_nil_string_and_null_answers_are_left_out_and_counted(tmp_path):
    root = write_jsonl(tmp_path / "kb")
    write_lines(root / "test.jsonl", [
        {"mention": "Paris", "sentence": "Paris", "answer": "nil"},
        {"mention": "Paris", "sentence": "in Paris", "answer": None},
        {"mention": "Paris", "sentence": "Paris, France", "answer": "paris"},
    ])
    benchmark = load_benchmark(root, splits=["test"])
    assert benchmark.splits["test"].to_dict() == {
        "mention": ["Paris"], "sentence": ["Paris, France"], "image": [None], "answer": ["paris"],
    }
    counts = benchmark.report.splits["test"]
    assert (counts.mentions, counts.nil_dropped) == (1, 2)
    assert "test (test.jsonl): 1 mentions, 2 nil left out" in benchmark.summary()


@pytest.mark.parametrize("file", ["train.jsonl", "entities.jsonl"])
def test_jsonl_file_not_utf8_names_file_line_and_byte(tmp_path, file):
    root = write_jsonl(tmp_path / "kb")
    size = len((root / file).read_bytes())
    lines = len((root / file).read_bytes().splitlines())
    with open(root / file, "ab") as handle:
        handle.write(b'{"mention": "\xff", "sentence": "s", "answer": "paris"}\n')
    offset = size + len(b'{"mention": "')
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(root / file))}, line {lines + 1}: not UTF-8: byte 0xff "
                                           rf"at byte offset {offset} of the file \(invalid start byte\)"):
        load_benchmark(root)


def test_jsonl_splits_are_train_dev_test_and_other_files_are_reported(tmp_path):
    root = write_jsonl(tmp_path / "kb")
    write_lines(root / "predictions.jsonl", [{"id": "m0", "top": ["paris"]}])  # a user's file, not a split
    write_lines(root / "validation.jsonl", [{"mention": "Paris", "sentence": "Paris", "answer": "paris"}])
    benchmark = load_benchmark(root)
    assert list(benchmark.splits) == ["train", "test"]
    assert benchmark.report.ignored_files == ["predictions.jsonl", "validation.jsonl"]
    dev = "looked for dev.jsonl; found validation.jsonl: rename it to dev.jsonl to use it as the dev split"
    assert benchmark.report.missing_splits == {"dev": dev}
    summary = benchmark.summary().splitlines()
    assert f"  dev: none, {dev}" in summary
    assert ("  ignored (no split file: splits are train.jsonl, dev.jsonl, test.jsonl; splits=[...] loads others): "
            "predictions.jsonl, validation.jsonl") in summary
    # Named explicitly, any {split}.jsonl loads.
    validation = load_benchmark(root, splits=["validation"])
    assert list(validation.splits) == ["validation"] and validation.splits["validation"]["answer"] == ["paris"]
    # What training needs: the file expected, and the near miss.
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(root))}: the dev split is missing: {re.escape(dev)}$"):
        benchmark.require_splits()
    benchmark.require_splits(["train", "test"])


def test_jsonl_empty_split_is_refused_by_require_splits(tmp_path):
    root = write_jsonl(tmp_path / "kb")
    (root / "dev.jsonl").write_text("")
    benchmark = load_benchmark(root)
    assert len(benchmark.splits["dev"]) == 0 and benchmark.report.missing_splits == {}
    with pytest.raises(MELDataError, match=rf"^{re.escape(str(root / 'dev.jsonl'))}: the dev split holds no mentions$"):
        benchmark.require_splits()
    write_lines(root / "dev.jsonl", [{"mention": "Paris", "sentence": "Paris", "answer": None}])
    with pytest.raises(MELDataError, match=r"dev\.jsonl: the dev split holds no mentions \(1 with a nil answer left "
                                           r"out\)$"):
        load_benchmark(root).require_splits()


def test_jsonl_unknown_fields_are_counted_and_named_not_refused(tmp_path):
    root = write_jsonl(tmp_path / "kb", entities=[
        {"id": "eiffel", "name": "Eiffel Tower", "description": "a tower", "imgs": ["images/tower.jpg"]},
        {"id": "paris", "name": "Paris", "description": "a city", "source": "wikidata"},
        {"id": "hilton", "name": "Paris Hilton", "description": "a person", "imgs": [], "source": "wikidata"},
    ], train=[
        {"id": "m0", "mention": "tower", "sentence": "the tower", "img": "images/post.png", "answer": "eiffel"},
        {"id": "m1", "mention": "Paris", "sentence": "in Paris", "answer": "paris"},
    ])
    benchmark = load_benchmark(root)
    assert benchmark.entities["images"] == [[], [], []]  # not read: counted, as the summary says why
    assert benchmark.report.unknown_entity_fields == {"imgs": (1, 2), "source": (2, 2)}
    assert benchmark.report.splits["train"].unknown_fields == {"img": (1, 1)}
    assert benchmark.report.splits["test"].unknown_fields == {}
    summary = benchmark.summary().splitlines()
    assert ("  entities.jsonl: unknown field 'imgs', not read (2 records, the first on line 1); did you mean "
            "'images'?") in summary
    assert ("  entities.jsonl: unknown field 'source', not read (2 records, the first on line 2) (fields read: id, "
            "name, description, images)") in summary
    assert "  train.jsonl: unknown field 'img', not read (line 1); did you mean 'image'?" in summary


def test_jsonl_missing_split(tmp_path):
    root = write_jsonl(tmp_path / "kb")
    with pytest.raises(MELDataError, match=rf"{re.escape(str(root))}: split 'dev' is missing: looked for dev\.jsonl"):
        load_benchmark(root, splits=["train", "dev"])
    os.remove(root / "train.jsonl")
    os.rename(root / "test.jsonl", root / "testing.jsonl")
    with pytest.raises(MELDataError, match=r"no split files: expected \{split\}\.jsonl files next to entities\.jsonl "
                                           r"\(train\.jsonl, dev\.jsonl, test\.jsonl\); found testing\.jsonl$"):
        load_benchmark(root)
    with pytest.raises(MELDataError, match=r"split 'test' is missing: looked for test\.jsonl; found testing\.jsonl: "
                                           r"rename it to test\.jsonl to use it as the test split$"):
        load_benchmark(root, splits=["test"])


# --------------------------------------------------------------------------------------------------- batches


def test_entity_image_first_in_evaluation_random_in_training():
    images = ["a.jpg", "b.jpg", "c.jpg"]
    assert entity_image(images, training=False) == "a.jpg"
    assert entity_image([], training=True) is None
    draws = [entity_image(images, True, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert set(draws) == set(images)
    generator = torch.Generator().manual_seed(3)
    first = [entity_image(images, True, generator) for _ in range(10)]
    generator.manual_seed(3)
    assert [entity_image(images, True, generator) for _ in range(10)] == first


def test_training_batch_is_aligned_and_ready_for_the_model(release):
    benchmark = load_benchmark(release)
    processor = tiny_processor(words=("paris", "hilton", "hotel"))
    mentions = benchmark.splits["test"][:]
    gold = benchmark.entities[[benchmark.entity_index[answer] for answer in mentions["answer"]]]
    batch = process_training_batch(processor, mentions, gold, generator=torch.Generator().manual_seed(0))
    assert sorted(batch) == sorted(["input_ids", "attention_mask", "pixel_values", "has_image", "entity_input_ids",
                                    "entity_attention_mask", "entity_pixel_values", "entity_has_image"])
    assert batch["input_ids"].shape == batch["entity_input_ids"].shape == (1, 40)
    assert batch["entity_pixel_values"].shape == (1, 3, 32, 32) and batch["entity_has_image"].tolist() == [True]
    expected = processor.process_entities("Paris", "capital of France", str(release / "kb_image" / "paris.jpg"))
    torch.testing.assert_close(batch["entity_pixel_values"], expected["pixel_values"])
    # A list of row dicts (what a DataLoader hands its collate_fn) gives the same batch.
    rows = [benchmark.splits["test"][0]]
    entity_rows = [benchmark.entities[benchmark.entity_index[rows[0]["answer"]]]]
    again = process_training_batch(processor, rows, entity_rows)
    torch.testing.assert_close(again["input_ids"], batch["input_ids"])
    # Evaluation encodes every entity with its first image.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # broken.jpg
        entities = process_entity_rows(processor, benchmark.entities[:], training=False)
    assert entities["has_image"].tolist() == [True, False, True, False]
    hilton_first = processor.process_entities("x", "y", str(release / "kb_image" / "hilton_0.jpg"))["pixel_values"]
    torch.testing.assert_close(entities["pixel_values"][2:3], hilton_first)
    with pytest.raises(ValueError, match="got 1 mentions but 2 gold entities"):
        process_training_batch(processor, rows, entity_rows * 2)


# --------------------------------------------------------------------------------------------------- sampler


def check_epoch(sampler, answers, batch_size):
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({answers[i] for i in batch}) == len(batch) for batch in batches)  # no duplicate gold
    assert sorted(i for batch in batches for i in batch) == list(range(len(answers)))  # each mention exactly once
    sizes = [len(batch) for batch in batches]
    assert max(sizes) <= batch_size and sizes == sorted(sizes, reverse=True)  # short batches only at the end
    return batches


def test_sampler_unique_golds_every_mention_once_deterministic():
    answers = [f"Q{g}" for g in np.random.default_rng(0).zipf(1.6, size=300) % 40]
    assert max(Counter(answers).values()) > 30
    sampler = UniqueGoldBatchSampler(answers, batch_size=16, seed=7)
    epochs = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        epochs.append(check_epoch(sampler, answers, 16))
        again = UniqueGoldBatchSampler(answers, batch_size=16, seed=7)
        again.set_epoch(epoch)
        assert list(again) == epochs[-1]
    assert all(epochs[0] != other for other in epochs[1:])
    other_seed = UniqueGoldBatchSampler(answers, batch_size=16, seed=8)
    assert list(other_seed) != epochs[0]


def test_sampler_places_every_mention_under_heavy_duplication():
    answers = ["hot"] * 50 + [f"Q{i}" for i in range(50)]
    sampler = UniqueGoldBatchSampler(answers, batch_size=8, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = check_epoch(sampler, answers, 8)
        assert len(batches) >= 50  # one "hot" per batch at most
        assert sum("hot" in [answers[i] for i in batch] for batch in batches) == 50


def most_full_batches(answers, batch_size):
    """Brute force: the largest b for which the golds' counts capped at b add up to b full batches."""
    counts = Counter(answers).values()
    return max(b for b in range(len(answers) // batch_size + 1) if sum(min(c, b) for c in counts) >= b * batch_size)


def check_full_epoch(sampler, answers, batch_size):
    batches = list(sampler)
    best = most_full_batches(answers, batch_size)
    assert len(batches) == len(sampler) == best
    assert all(len(batch) == batch_size for batch in batches)  # every batch full
    assert all(len({answers[i] for i in batch}) == batch_size for batch in batches)  # no duplicate gold
    placed = [i for batch in batches for i in batch]
    assert len(placed) == len(set(placed)) and set(placed) <= set(range(len(answers)))  # each mention at most once
    assert sampler.left_out == len(answers) - best * batch_size == len(answers) - len(placed)
    return batches


SKEWED = [f"Q{g}" for g in np.random.default_rng(3).zipf(1.5, size=500) % 60]


@pytest.mark.parametrize(
    "answers, batch_size, best",
    [
        (["a"] * 5 + ["b", "c", "d"], 2, 3),  # "a" in every batch, 2 of its 5 left out
        (["hot"] * 20 + [f"Q{i}" for i in range(45)], 8, 6),  # 6 + 45 >= 48 but 7 + 45 < 56: 17 of 65 left out
        ([f"Q{i}" for i in range(103)], 10, 10),  # all distinct, 103 not a multiple of 10: 3 trimmed
        (["only"] * 9, 1, 9),  # a single gold, batch of 1: every mention in a batch of its own
        (["only"] * 9, 2, 0),  # a single gold cannot fill a batch of 2
        ([f"Q{i % 7}" for i in range(70)], 8, 0),  # 7 distinct golds, batches of 8
        ([f"Q{i % 7}" for i in range(70)], 7, 10),  # 7 golds, 10 mentions each: exactly 10 batches
        ([1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6], 3, 4),  # capped at 4: 4+3+2+1+1+1 = 12
        ([1, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6], 4, 2),  # capped at 3: 3+3+2+3 = 11 < 12; at 2: 2+2+2+3 = 9 >= 8
        (SKEWED, 16, None),
        (SKEWED, 7, None),
    ],
)
def test_sampler_drop_last_packs_the_most_full_batches(answers, batch_size, best):
    if best is not None:
        assert most_full_batches(answers, batch_size) == best
    sampler = UniqueGoldBatchSampler(answers, batch_size, seed=5, drop_last=True)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        check_full_epoch(sampler, answers, batch_size)
    assert UniqueGoldBatchSampler.most_full_batches(list(Counter(answers).values()), batch_size) == len(sampler)


def test_sampler_drop_last_is_optimal_on_random_answer_lists():
    rng = np.random.default_rng(11)
    empty_plans = 0
    for case in range(400):
        size = int(rng.integers(1, 12))
        golds = int(rng.integers(1, 25))
        n = int(rng.integers(0, 90))
        answers = (rng.zipf(1.2 + rng.random(), n) if case % 2 else rng.integers(0, golds, n)) % golds
        answers = [f"Q{g}" for g in answers]
        sampler = UniqueGoldBatchSampler(answers, size, seed=case, drop_last=True)
        empty_plans += len(sampler) == 0
        check_full_epoch(sampler, answers, size)
        sampler.set_epoch(1)
        check_full_epoch(sampler, answers, size)
    assert 0 < empty_plans < 200  # some cases cannot fill a batch, most can


def test_sampler_drop_last_is_deterministic_and_leaves_other_mentions_out_each_epoch():
    # 10 batches of 8 (10 + 10 + 63 >= 80, 11 + 11 + 63 < 88): 20 "hot", 2 "warm" and 3 more left out of 105
    answers = ["hot"] * 30 + ["warm"] * 12 + [f"Q{i}" for i in range(63)]
    assert most_full_batches(answers, 8) == 10
    sampler = UniqueGoldBatchSampler(answers, 8, seed=7, drop_last=True)
    seen, left_out_sets = Counter(), set()
    for epoch in range(40):
        sampler.set_epoch(epoch)
        batches = check_full_epoch(sampler, answers, 8)
        assert sampler.left_out == 25
        again = UniqueGoldBatchSampler(answers, 8, seed=7, drop_last=True)
        again.set_epoch(epoch)
        assert list(again) == batches
        placed = {i for batch in batches for i in batch}
        seen.update(placed)
        left_out_sets.add(frozenset(set(range(len(answers))) - placed))
        assert 7 <= sum(answers[i] == "hot" for i in placed) <= 10 and 7 <= sum(answers[i] == "warm" for i in placed)
        assert sum(answers[i] not in ("hot", "warm") for i in placed) >= 60
    assert len(left_out_sets) == 40  # different mentions left out every epoch
    assert set(seen) == set(range(len(answers)))  # over the epochs every mention had its turn, "hot" ones included
    other_seed = UniqueGoldBatchSampler(answers, 8, seed=8, drop_last=True)
    assert list(other_seed) != list(UniqueGoldBatchSampler(answers, 8, seed=7, drop_last=True))


def test_sampler_drop_last_shuffles_batches_and_their_mentions():
    answers = [f"Q{i % 40}" for i in range(200)]  # 40 golds, 5 mentions each
    sampler = UniqueGoldBatchSampler(answers, 10, seed=0, drop_last=True)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert len(first) == len(second) == 20
    assert first != second and {frozenset(b) for b in first} != {frozenset(b) for b in second}
    assert any(batch != sorted(batch) for batch in first)  # not in index order inside a batch
    # Which golds meet in a batch varies: over the epochs a gold meets more than the few it would with a fixed layout.
    met = {}
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for i in batch:
                met.setdefault(answers[i], set()).update(answers[j] for j in batch if j != i)
    assert min(len(others) for others in met.values()) >= 30


def test_sampler_without_drop_last_still_places_every_mention_once():
    for answers, size in [(SKEWED, 16), (["hot"] * 20 + [f"Q{i}" for i in range(45)], 8), (["only"] * 9, 2)]:
        sampler = UniqueGoldBatchSampler(answers, size, seed=1)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            check_epoch(sampler, answers, size)
            assert sampler.left_out == 0
    with pytest.raises(ValueError, match="batch_size must be positive"):
        UniqueGoldBatchSampler(["a"], batch_size=0)


def test_sampler_drop_last_on_the_demo(tmp_path):
    """The built-in demo (1,485 training mentions of 160 entities, at most 15 of one): 11 full batches of 128 (77
    mentions left out: the greedy plan this replaced made 10 and left 205 out) and 46 of 32 (13 left out)."""
    from modeling_m3el.demo import write_demo_benchmark

    answers = load_benchmark(write_demo_benchmark(tmp_path / "demo")).splits["train"]["answer"]
    assert (len(answers), len(set(answers)), max(Counter(answers).values())) == (1485, 160, 15)
    for size, batches, left_out in [(128, 11, 77), (32, 46, 13)]:
        assert most_full_batches(answers, size) == batches
        sampler = UniqueGoldBatchSampler(answers, size, seed=0, drop_last=True)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            check_full_epoch(sampler, answers, size)
            assert sampler.left_out == left_out


def test_sampler_drives_a_dataloader(release):
    benchmark = load_benchmark(release)
    train = benchmark.splits["train"]
    processor = tiny_processor(words=("paris", "hilton", "hotel"))
    sampler = UniqueGoldBatchSampler(train["answer"], batch_size=3, seed=0)

    def collate(rows):
        gold = [benchmark.entities[benchmark.entity_index[row["answer"]]] for row in rows]
        return process_training_batch(processor, rows, gold)

    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # m4.jpg is unreadable
        sizes = [len(batch["input_ids"]) for batch in loader]
    assert sizes == [3, 1]  # m0 and m4 share the gold Q10
