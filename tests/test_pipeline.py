"""The multimodal-entity-linking pipeline: loaded from a published folder in a fresh process that cannot import the
package, it links the demo's test mentions as often as the training run's Hits@1 says; inputs in every image form,
batching, the index from the folder, a path, an object or entity dicts; clear errors for bad inputs."""

import ast
import base64
import io
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import run_without_package
from PIL import Image

from modeling_m3el import M3ELModel, M3ELProcessor
from modeling_m3el.index_m3el import EntityIndex, StaleIndexError
from modeling_m3el.pipeline_m3el import TASK, M3ELEntityLinkingPipeline, load_entities
from modeling_m3el.tiny import tiny_config

# Links every mention of a JSON file and prints, per mention, the top entities' ids and scores.
FRESH_LINK = """
import json, sys
import torch
from transformers import pipeline

folder, mentions = sys.argv[1], json.load(open(sys.argv[2]))
linker = pipeline("multimodal-entity-linking", model=folder, trust_remote_code=True)
assert type(linker).__module__.startswith("transformers_modules"), type(linker).__module__
assert type(linker.model).__module__.startswith("transformers_modules"), type(linker.model).__module__
results = linker(mentions, top_k=2, batch_size=16)
among = linker(mentions, top_k=2, batch_size=16, candidates=8)  # the exact scores of 8 candidates by estimate
print(json.dumps({"device": str(linker.device), "dtype": str(linker.model.dtype), "entities": len(linker.index),
                  "top": [[(e["id"], e["score"], e["name"]) for e in entities] for entities in results],
                  "top_among_8": [[(e["id"], e["score"]) for e in entities] for entities in among]}))
"""


@pytest.fixture(scope="module")
def linker(hub_folder):
    """The pipeline built from the package's classes on the published folder (its index and metadata by default)."""
    model = M3ELModel.from_pretrained(hub_folder).eval()
    return M3ELEntityLinkingPipeline(model=model, processor=M3ELProcessor.from_pretrained(hub_folder), device="cpu")


def test_fresh_process_links_as_often_as_the_runs_hits_at_1(hub_folder, demo_run, test_mentions, tmp_path):
    mentions = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions]
    (tmp_path / "mentions.json").write_text(json.dumps(mentions))
    result = run_without_package(FRESH_LINK, str(hub_folder), str(tmp_path / "mentions.json"))
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["entities"] == 160 and output["dtype"] == "torch.float32"
    top = output["top"]
    hits = sum(entities[0][0] == m["answer"] for entities, m in zip(top, test_mentions))
    # The run ranks ties against the gold entity; top-k may put a tied gold first. Only a tie can tell them apart.
    ties = sum(entities[0][0] == m["answer"] and entities[0][1] == entities[1][1]
               for entities, m in zip(top, test_mentions))
    run = json.loads((demo_run / "model" / "test_results.json").read_text())
    assert run["count"] == len(test_mentions)
    run_hits = round(run["hits@1"] * run["count"])
    assert run_hits <= hits <= run_hits + ties, (hits, run_hits, ties)
    assert hits >= 0.5 * len(test_mentions)  # the demo run learnt something: the comparison is not vacuous
    names = {json.loads(line)["id"]: json.loads(line)["name"] for line in (hub_folder / "entities.jsonl").open()}
    assert all(name == names[entity_id] for entities in top for entity_id, _, name in entities)
    # Among 8 candidates (5% of the KB), the Hub code finds the exact top-1 of nearly every mention, scored exactly.
    among = output["top_among_8"]
    same = [entities[0][0] == exact[0][0] for entities, exact in zip(among, top)]
    assert sum(same) >= 0.95 * len(top)
    for entities, exact, found in zip(among, top, same):
        if found:
            assert entities[0][1] == pytest.approx(exact[0][1], rel=1e-5, abs=1e-5)


def test_the_folder_registers_the_pipeline_and_its_code(hub_folder):
    config = json.loads((hub_folder / "config.json").read_text())
    assert config["custom_pipelines"] == {
        TASK: {"impl": "pipeline_m3el.M3ELEntityLinkingPipeline", "pt": ["AutoModel"], "type": "multimodal"}
    }
    assert config["auto_map"]["AutoModel"] == "modeling_m3el.M3ELModel"
    for name in ("pipeline_m3el.py", "index_m3el.py", "modeling_m3el.py", "kernels_m3el.py", "configuration_m3el.py"):
        assert (hub_folder / name).is_file(), name
    # Hub files import only what a machine without the package has, and their siblings relatively.
    allowed = {"torch", "transformers", "safetensors", "PIL", "numpy", "huggingface_hub", "tqdm"}
    stdlib = set(sys.stdlib_module_names)
    for name in ("pipeline_m3el.py", "index_m3el.py", "kernels_m3el.py"):
        tree = ast.parse((hub_folder / name).read_text())
        # Triton is optional: imported only inside a try block (transformers' import check skips those).
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
        for node in ast.walk(tree):
            modules = ([node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                       else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            for module in modules:
                top = module.split(".")[0]
                assert top in allowed | stdlib or (top == "triton" and id(node) in optional), (name, module)


def test_every_image_form_and_batching_give_the_same_ranking(linker, test_mentions):
    mention = next(m for m in test_mentions if m["image"])
    path = mention["image"]
    data = open(path, "rb").read()
    forms = {
        "path": path,
        "pil": Image.open(io.BytesIO(data)),
        "bytes": data,
        "base64": base64.b64encode(data).decode(),
        "data_url": "data:image/jpeg;base64," + base64.b64encode(data).decode(),
    }
    reference = linker({"mention": mention["mention"], "text": mention["text"], "image": path}, top_k=3)
    assert [e["rank"] for e in reference] == [1, 2, 3]
    assert set(reference[0]) == {"rank", "id", "name", "description", "score", "probability", "image"}
    assert reference[0]["score"] >= reference[1]["score"] >= reference[2]["score"]
    assert 0 < reference[2]["probability"] <= reference[0]["probability"] <= 1
    for form, image in forms.items():
        result = linker({"mention": mention["mention"], "text": mention["text"], "image": image}, top_k=3)
        assert [e["id"] for e in result] == [e["id"] for e in reference], form
        torch.testing.assert_close([e["score"] for e in result], [e["score"] for e in reference])

    batch = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions[:12]]
    one_by_one = linker(batch, top_k=4)
    batched = linker(batch, top_k=4, batch_size=5)  # batches of 5, 5 and 2
    assert len(batched) == 12
    for single, grouped in zip(one_by_one, batched):
        assert [e["id"] for e in single] == [e["id"] for e in grouped]
        torch.testing.assert_close([e["score"] for e in single], [e["score"] for e in grouped], rtol=1e-4, atol=1e-4)
    # No image is allowed (the all-zero image, as in training); top_k beyond the KB returns the whole KB.
    assert len(linker({"mention": "Atlas", "text": "the Atlas near the water"}, top_k=1000)) == 160
    # Entity images are thumbnails in the folder.
    assert all(e["image"] is None or e["image"].endswith(".jpg") for e in reference)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "the Atlas near the water"}, "missing field 'mention'"),
        ({"mention": "Atlas"}, "missing field 'text'"),
        ({"mention": "Atlas", "text": "   "}, "'text' is empty"),
        ({"mention": "", "text": "the Atlas"}, "'mention' is empty"),
        ({"mention": "Atlas", "text": "the Atlas", "img": "x.jpg"}, "unknown field"),
        ({"mention": "Atlas", "text": 3}, "'text' must be a string"),
        ("Atlas", "inputs must be a mention"),
        ([], "no mentions to link"),
        ({"mention": "Atlas", "text": "the Atlas", "image": "/no/such/image.jpg"}, "unreadable image"),
        ({"mention": "Atlas", "text": "the Atlas", "image": b"not an image"}, "unreadable image"),
    ],
)
def test_bad_inputs_raise_a_clear_value_error(linker, bad, message):
    with pytest.raises(ValueError, match=message):
        linker(bad)


def test_candidates_are_rescored_exactly_and_their_softmax_is_the_probability(linker, test_mentions):
    """`candidates=K`: the top_k of the exact scores of the K entities with the best `score_estimate`, each with the
    softmax over those K scores; K at least the KB size is the default (every entity scored)."""
    mentions = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions[:10]]
    model, index = linker.model, linker.index
    inputs = linker.processor.process_mentions(*zip(*[(m["mention"], m["text"], m["image"]) for m in mentions]))
    with torch.no_grad():
        features = model.encode(**inputs)
        prepared = model.prepare_mentions(features)
        entities = index._prepared(0, len(index))
        estimate = model.score_estimate(prepared, entities)
        exact = model.score_prepared(prepared, entities).logits
    for results, row_estimate, row_exact in zip(linker(mentions, top_k=3, candidates=6), estimate, exact):
        chosen = row_estimate.topk(6).indices
        expected = row_exact[chosen].sort(descending=True)
        assert [e["id"] for e in results] == [index.entity_ids[int(chosen[i])] for i in expected.indices[:3]]
        torch.testing.assert_close([e["score"] for e in results], expected.values[:3].tolist(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close([e["probability"] for e in results],
                                   expected.values.softmax(dim=0)[:3].tolist(), rtol=1e-5, atol=1e-6)
    # top_k beyond K returns the K candidates
    assert len(linker(mentions[0], top_k=10, candidates=4)) == 4
    for everything in (len(index), 10_000):
        assert linker(mentions, top_k=3, candidates=everything) == linker(mentions, top_k=3)
    for bad in (0, -2, 1.5, "8", True):
        with pytest.raises(ValueError, match="candidates must be a positive integer"):
            linker(mentions[0], candidates=bad)


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", True])
def test_bad_top_k(linker, top_k):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        linker({"mention": "Atlas", "text": "the Atlas"}, top_k=top_k)


def test_unreadable_image_zero_mode_follows_the_processor(linker):
    before = linker.processor.num_unreadable_images
    text_only = linker({"mention": "Atlas", "text": "the Atlas near the water"}, top_k=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = linker({"mention": "Atlas", "text": "the Atlas near the water", "image": b"garbage"}, top_k=3,
                        unreadable_image="zero")
    assert any("Unreadable image" in str(w.message) for w in caught)
    assert linker.processor.num_unreadable_images == before + 1
    assert [e["id"] for e in result] == [e["id"] for e in text_only]  # the all-zero image, like no image


def test_index_from_an_object_a_folder_or_entity_dicts(linker, hub_folder, demo_data, test_mentions):
    from modeling_m3el.data import load_benchmark
    from modeling_m3el.evaluation import index_rows

    mentions = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions[:8]]
    expected = [[e["id"] for e in entities] for entities in linker(mentions, top_k=3)]
    model, processor = linker.model, linker.processor
    entities = index_rows(load_benchmark(demo_data, splits=[]).entities)
    for index in (EntityIndex.load(hub_folder, model), str(hub_folder), entities):
        other = M3ELEntityLinkingPipeline(model=model, processor=processor, index=index, device="cpu")
        assert [[e["id"] for e in r] for r in other(mentions, top_k=3)] == expected
    # Entity dicts carry their own metadata; an index object has none unless given.
    built = M3ELEntityLinkingPipeline(model=model, processor=processor, index=entities, device="cpu")
    assert built(mentions[0], top_k=1)[0]["name"] is not None
    bare = M3ELEntityLinkingPipeline(model=model, processor=processor, index=linker.index, device="cpu")
    assert bare(mentions[0], top_k=1)[0]["name"] is None
    named = M3ELEntityLinkingPipeline(model=model, processor=processor, index=linker.index,
                                      entities=str(hub_folder / "entities.jsonl"), device="cpu")
    assert named(mentions[0], top_k=1)[0] == linker(mentions[0], top_k=1)[0]


def test_an_index_of_another_model_or_none_is_refused(linker, hub_folder, tmp_path):
    other = M3ELModel(tiny_config(linker.processor, matching_dim=16)).eval()
    with pytest.raises(StaleIndexError):
        M3ELEntityLinkingPipeline(model=other, processor=linker.processor, index=str(hub_folder), device="cpu")
    other.save_pretrained(tmp_path / "bare")
    bare = M3ELModel.from_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="holds no entity index"):
        M3ELEntityLinkingPipeline(model=bare, processor=linker.processor, device="cpu")
    with pytest.raises(ValueError, match="needs the model's processor"):
        M3ELEntityLinkingPipeline(model=bare, device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factory_dtype_and_device_then_save_pretrained(hub_folder, test_mentions, tmp_path, dtype):
    """The published folder's index accepts the checkpoint in half precision (bfloat16 and float16 roundings both
    fingerprinted); the pipeline then saves (the dtype transformers hands the processor is not kept) and loads again
    with the same scores, its entity images copied along."""
    from transformers import pipeline

    linker = pipeline(TASK, model=str(hub_folder), trust_remote_code=True, dtype=dtype, device="cpu")
    assert linker.model.dtype == dtype and linker.index.dtype == dtype
    assert linker.device == torch.device("cpu") and linker.index.device == torch.device("cpu")
    mentions = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions[:6]]
    result = linker(mentions, top_k=3)
    exact = pipeline(TASK, model=str(hub_folder), trust_remote_code=True, device="cpu")(mentions, top_k=3)
    assert [r[0]["id"] for r in result] == [r[0]["id"] for r in exact]
    assert [r[0]["score"] for r in result] == pytest.approx([r[0]["score"] for r in exact], abs=0.1)
    linker.save_pretrained(tmp_path / "saved")
    again = pipeline(TASK, model=str(tmp_path / "saved"), trust_remote_code=True, dtype=dtype, device="cpu")
    reloaded = again(mentions, top_k=3)
    pairs = [[(e["id"], e["score"]) for e in r] for r in result]
    assert [[(e["id"], e["score"]) for e in r] for r in reloaded] == pairs
    images = [e["image"] for r in reloaded for e in r if e["image"] is not None]
    assert images and all(image.startswith(str(tmp_path / "saved")) and os.path.isfile(image) for image in images)
    # Saved in half precision, the checkpoint's weights are those: its index serves them in every dtype.
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    for reload_dtype in (other, torch.float32):
        assert pipeline(TASK, model=str(tmp_path / "saved"), trust_remote_code=True, dtype=reload_dtype,
                        device="cpu")(mentions[0], top_k=1)[0]["id"] == result[0][0]["id"]


def test_errors_name_the_input_and_numpy_integers_count(linker, test_mentions, tmp_path):
    mentions = [{key: m[key] for key in ("mention", "text", "image")} for m in test_mentions[:2]]
    with pytest.raises(ValueError, match=r"input 1 \(mention '.*'\): unreadable image"):
        linker([mentions[0], {**mentions[1], "image": str(tmp_path / "absent.jpg")}])
    assert linker(mentions[0], top_k=np.int64(2), candidates=np.int32(5)) == linker(mentions[0], top_k=2, candidates=5)
    model, processor = linker.model, linker.processor
    for index, message in [
        ({"id": "Q1"}, "index must be an EntityIndex, a folder or Hub repo holding one, or a list of entity dicts"),
        ([{"id": "Q1", "name": "x"}], "index entity 0: missing field\\(s\\) 'description'"),
        (["Q1"], "index entity 0: an entity is a dict"),
        (str(tmp_path / "absent"), "no such folder: .*absent"),
    ]:
        with pytest.raises(ValueError, match=message):
            M3ELEntityLinkingPipeline(model=model, processor=processor, index=index, device="cpu")


def test_m3el_link_command(hub_folder, linker, test_mentions, capsys):
    from modeling_m3el.cli import main

    mention = next(m for m in test_mentions if m["image"])
    arguments = ["link", "--model", str(hub_folder), "--mention", mention["mention"], "--sentence", mention["text"],
                 "--image", mention["image"], "--top-k", "3", "--device", "cpu"]
    assert main([*arguments, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = linker({key: mention[key] for key in ("mention", "text", "image")}, top_k=3)
    # names, descriptions and images read after ranking for the results alone: what the pipeline shows
    assert [{k: e[k] for k in ("rank", "id", "name", "description", "image")} for e in printed] == [
        {k: e[k] for k in ("rank", "id", "name", "description", "image")} for e in expected]
    assert all(e["name"] and e["image"] and os.path.isfile(e["image"]) for e in printed)
    assert [e["score"] for e in printed] == pytest.approx([e["score"] for e in expected])
    assert main(arguments) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 3 and table[0].split()[0] == "1" and expected[0]["id"] in table[0]
    # probabilities to three significant digits (over a large KB they are small)
    assert [float(line.split()[2]) for line in table] == pytest.approx(
        [float(f"{e['probability']:.3g}") for e in expected])
    with pytest.raises(SystemExit, match="unreadable image"):
        main([*arguments[:-4], "--image", str(hub_folder / "config.json")])
    assert main([*arguments, "--candidates", "5", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = linker({key: mention[key] for key in ("mention", "text", "image")}, top_k=3, candidates=5)
    assert [e["id"] for e in printed] == [e["id"] for e in expected]
    assert [e["probability"] for e in printed] == pytest.approx([e["probability"] for e in expected])
    with pytest.raises(SystemExit, match="candidates must be a positive integer"):
        main([*arguments, "--candidates", "0"])


def test_load_entities_of_given_ids_parses_only_their_lines(tmp_path):
    path = tmp_path / "entities.jsonl"
    records = [{"id": "Q1", "name": "Jaguar", "description": "a cat"},
               {"id": "Q12", "name": "Q1", "description": "a line that holds \"Q1\" but is not Q1's"},
               {"id": "Zoë", "name": "Zoë", "description": "a name"},
               {"id": "a/b", "name": "slash", "description": "its id written with an escape"},
               {"id": "é", "name": "e", "description": "its id written as \\u00e9", "source": {"id": "Q1"}}]
    lines = [json.dumps(records[0]), "{not json", json.dumps(records[1]), json.dumps(records[2], ensure_ascii=False),
             json.dumps(records[3]).replace("a/b", "a\\/b"), json.dumps(records[4]), "", "\r"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_entities(path, ids=["Q1"]) == [records[0]]  # Q12's line is parsed (it holds "Q1"), and left out
    assert load_entities(path, ids=["Zoë", "Q12"]) == [records[1], records[2]]  # in file order
    assert load_entities(path, ids=["a/b", "é"]) == [records[3], records[4]]  # escaped ids are found
    assert load_entities(path, ids=["\ud800", "Q404"]) == []  # (an id no UTF-8 file can hold as it is)
    assert load_entities(path, ids=[]) == [] and load_entities(path, ids=["Q404"]) == []
    # the damaged line holds none of the ids: never parsed; without ids every line is, and it is refused
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        load_entities(path)
    # more ids than one regular expression holds: every line's ids are decoded and looked up, the same records
    many = ["Q1", "Zoë", "a/b", "é"] + [f"absent-{n}" for n in range(40)]
    assert load_entities(path, ids=many) == [records[0], records[2], records[3], records[4]]


def test_entity_records_read_lines_as_asked_for_and_equal_the_parsed_file(tmp_path):
    """`EntityRecords` (what a pipeline reads its KB's metadata through) holds each id's line offset, not the records:
    the same records as `load_entities`, for lines that start with their id and lines that do not (ids with escapes,
    another key first, a nested "id" first, a second "id" key, which JSON reads as the id), a byte order mark, blank
    lines and Windows line ends; an id on two lines is the later one."""
    import copy
    import pickle

    from modeling_m3el.pipeline_m3el import EntityRecords

    records = [{"id": "Q1", "name": "Jaguar", "description": "a cat", "images": ["a.jpg"]},
               {"name": "id first? no", "id": "Q2", "description": "its id is not its first key"},
               {"source": {"id": "Q1"}, "id": "Q3", "name": "nested", "description": "a nested id first"},
               {"id": "é", "name": "e", "description": "its id written as \\u00e9"},
               {"id": "Zoë", "name": "Zoë", "description": "written as it is"},
               {"id": "Q1", "name": "Jaguar (car)", "description": "Q1 again: this line wins"},
               {"id": "Q5", "name": "two ids", "description": "its second id key is its id"}]
    lines = [json.dumps(records[0]), json.dumps(records[1]), "", json.dumps(records[2]), json.dumps(records[3]),
             "  ", json.dumps(records[4], ensure_ascii=False), json.dumps(records[5]),
             json.dumps(records[6]).replace('"id": "Q5", "name": "two ids"',
                                            '"id": "Q4", "name": "two ids", "id": "Q5"')]
    lines.append('{"id": "Q6", "name": "escaped", "\\u0069d": "Q7"}')  # a second id key, written with escapes
    path = tmp_path / "entities.jsonl"
    # (a byte order mark first, on a line of its own)
    path.write_bytes(b"\xef\xbb\xbf\r\n" + ("\r\n".join(lines) + "\r\n").encode("utf-8"))
    lazy = EntityRecords(path)
    parsed = {record["id"]: record for record in load_entities(path)}
    assert list(lazy) == list(parsed) == ["Q1", "Q2", "Q3", "é", "Zoë", "Q5", "Q7"]
    assert dict(lazy) == parsed and lazy["Q1"] == records[5] and len(lazy) == 7 and lazy["Q5"] == records[6]
    assert "Q2" in lazy and "Q4" not in lazy and lazy.get("Q4") is None
    with pytest.raises(KeyError):
        lazy["Q4"]
    for duplicate in (copy.deepcopy(lazy), pickle.loads(pickle.dumps(lazy))):  # each opens the file anew
        assert dict(duplicate) == parsed
    # A file replaced since (renamed over) is not seen: the one opened is read.
    replacement = tmp_path / "new.jsonl"
    replacement.write_text(json.dumps({"id": "Q9", "name": "new", "description": "x"}) + "\n")
    os.replace(replacement, path)
    assert lazy["Zoë"] == records[4]
    lazy.close()


def test_entity_records_errors_name_the_file_and_line(tmp_path):
    from modeling_m3el.pipeline_m3el import EntityRecords

    path = tmp_path / "entities.jsonl"
    good = json.dumps({"id": "Q1", "name": "a", "description": "b"})
    # A line that does not start with its id is parsed when the file is opened.
    path.write_text("\n".join([good, '{"name": "no id"}']) + "\n")
    with pytest.raises(ValueError, match=r"entities\.jsonl, line 2: an entity needs a string 'id'"):
        EntityRecords(path)
    path.write_text("\n".join([good, "{not json"]) + "\n")
    with pytest.raises(ValueError, match=r"entities\.jsonl, line 2: not valid JSON"):
        EntityRecords(path)
    # Old Mac line ends (carriage returns alone) make one line of several records: refused at once, as load_entities
    path.write_bytes(b'{"id": "Q1", "name": "a"}\r{"id": "Q2", "name": "b"}\r\n')
    for read in (EntityRecords, load_entities):
        with pytest.raises(ValueError, match=r"entities\.jsonl, line 1: not valid JSON \(Extra data\)"):
            read(path)
    # Bytes that are not UTF-8 (here an encoded surrogate): refused by both, naming the line (EntityRecords: when read)
    path.write_bytes(b"\n".join([good.encode(), b'{"id": "Q2", "name": "\xed\xa0\x80"}']) + b"\n")
    with pytest.raises(ValueError, match=r"entities\.jsonl, line 2: not valid UTF-8"):
        load_entities(path)
    with EntityRecords(path) as lazy:
        assert lazy["Q1"]["name"] == "a"
        with pytest.raises(ValueError, match=r"entities\.jsonl, line 2: not valid UTF-8"):
            lazy["Q2"]
    # One that does is parsed when its record is asked for: the error comes then, with its line.
    path.write_text("\n".join([good, "", '{"id": "Q2", "name": "cut short']) + "\n")
    lazy = EntityRecords(path)
    assert lazy["Q1"]["name"] == "a"
    with pytest.raises(ValueError, match=r"entities\.jsonl, line 3: not valid JSON"):
        lazy["Q2"]
    lazy.close()
    # A file changed in place under it is said to have changed, not read as another entity's record.
    path.write_text("\n".join([good, json.dumps({"id": "Q2", "name": "c", "description": "d"})]) + "\n")
    lazy = EntityRecords(path)
    with open(path, "r+b") as f:  # the same length: the two ids swapped
        f.write(path.read_bytes().replace(b'"Q1"', b'"QX"'))
    with pytest.raises(ValueError, match="changed since it was opened"):
        lazy["Q1"]
    lazy.close()


def test_entity_records_hold_their_file(tmp_path, monkeypatch):
    """The file is held by its absolute path and open handle: a change of working directory, a copy, the file's
    folder removed; a dropped `EntityRecords` closes its file."""
    import copy
    import gc

    from modeling_m3el.pipeline_m3el import EntityRecords

    (tmp_path / "kb").mkdir()
    path = tmp_path / "kb" / "entities.jsonl"
    path.write_text(json.dumps({"id": "Q1", "name": "a", "description": "b"}) + "\n")
    monkeypatch.chdir(tmp_path / "kb")
    lazy = EntityRecords("entities.jsonl")
    monkeypatch.chdir(tmp_path)
    assert lazy.path == str(path) and copy.deepcopy(lazy)["Q1"]["name"] == "a"
    assert lazy.holds(path) and not lazy.holds(tmp_path / "elsewhere.jsonl")
    closed = copy.copy(lazy)  # (a copy opens the file anew: closing it leaves the original open)
    closed.close()
    with pytest.raises(ValueError, match=r"EntityRecords\(.*entities\.jsonl', 1 entities\) is closed"):
        closed["Q1"]
    assert not closed.holds(path) and lazy["Q1"]["name"] == "a"
    path.unlink()
    assert lazy["Q1"]["name"] == "a" and not lazy.holds(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del lazy
        gc.collect()


def test_a_pipeline_saved_into_the_folder_it_reads_its_metadata_from(linker, hub_folder, test_mentions, tmp_path):
    """The pipeline reads `entities.jsonl` as results need it, from the file it opened; saving into that very folder
    replaces the file, which the pipeline then reads (on Windows a file held open could not be replaced)."""
    import shutil

    from modeling_m3el.pipeline_m3el import EntityRecords

    folder = tmp_path / "copy"
    shutil.copytree(hub_folder, folder)
    model = M3ELModel.from_pretrained(folder).eval()
    own = M3ELEntityLinkingPipeline(model=model, processor=linker.processor, device="cpu")
    assert isinstance(own.entities, EntityRecords) and len(own.entities) == len(own.index)
    mention = {key: test_mentions[0][key] for key in ("mention", "text", "image")}
    before = own(mention, top_k=3)
    assert before == [dict(e, image=e["image"].replace(str(hub_folder), str(folder)) if e["image"] else None)
                      for e in linker(mention, top_k=3)]
    own.save_pretrained(folder)
    assert own(mention, top_k=3) == before
    assert own.entities.path == str(folder / "entities.jsonl") and own.entities.holds(folder / "entities.jsonl")
    assert {record["id"] for record in load_entities(folder / "entities.jsonl")} == set(own.index.entity_ids)
    # The folder read from removed: the results still show their names and descriptions (their images went with the
    # folder), and saving elsewhere (twice) works.
    shutil.copytree(folder, tmp_path / "moved")
    shutil.rmtree(folder)
    assert own(mention, top_k=3) == [dict(e, image=None) for e in before]
    for _ in range(2):
        with pytest.warns(UserWarning, match="entity images referenced in entities.jsonl were not copied"):
            own.save_pretrained(tmp_path / "out")
    assert load_entities(tmp_path / "out" / "entities.jsonl") == load_entities(tmp_path / "moved" / "entities.jsonl")
    # An EntityRecords (or a dict of records) can be given as the metadata; its folder is where its images live.
    given = EntityRecords(tmp_path / "moved" / "entities.jsonl")
    own.set_entities(given)
    assert own(mention, top_k=3) == [dict(e, image=e["image"].replace(str(folder), str(tmp_path / "moved"))
                                          if e["image"] else None) for e in before]
    own.set_entities([])  # the pipeline closes the files it opened, not one it was given
    assert given[before[0]["id"]]["name"] == before[0]["name"]
    given.close()
