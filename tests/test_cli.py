"""The `m3el` command: eval and index on a saved model and a benchmark folder give what the library computes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from modeling_m3el import M3ELModel
from modeling_m3el.cli import main
from modeling_m3el.data import load_benchmark
from modeling_m3el.demo import demo_processor, write_demo_benchmark
from modeling_m3el.evaluation import gold_ranks, index_rows, ranking_metrics
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.tiny import tiny_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_demo_benchmark(root / "data", seed=5, num_names=6, train=10, dev=10, test=30)
    processor = demo_processor()
    torch.manual_seed(0)
    model = M3ELModel(tiny_config(processor)).eval()
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    return root, data, model, processor


def test_eval_matches_the_library(saved, capsys):
    root, data, model, processor = saved
    output = root / "results.json"
    assert main(["eval", "--model", str(root / "model"), "--data", data, "--split", "test", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    benchmark = load_benchmark(data, splits=["test"])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), progress=False)
    expected = ranking_metrics(gold_ranks(model, processor, index, benchmark.splits["test"], progress=False))
    for key, value in expected.items():
        assert results[key] == pytest.approx(value), key
    assert results["entities"] == len(benchmark.entities) and results["split"] == "test"
    assert json.loads(capsys.readouterr().out) == results


def test_index_then_eval_with_the_saved_index(saved):
    root, data, *_ = saved
    assert main(["index", "--model", str(root / "model"), "--data", data, "--output", str(root / "index")]) == 0
    assert (root / "index" / "entity_index.safetensors").exists()
    # beside it, the KB's metadata, which `m3el link --index` shows with the results (names, existing image paths)
    entities = [json.loads(line) for line in (root / "index" / "entities.jsonl").read_text().splitlines()]
    kb = {str(row["id"]): row for row in load_benchmark(data, splits=[]).entities}
    assert [e["id"] for e in entities] == list(kb)
    for entity in entities:
        assert (entity["name"], entity["description"]) == (kb[entity["id"]]["name"], kb[entity["id"]]["description"])
        assert [os.path.samefile(a, b) for a, b in zip(entity["images"], kb[entity["id"]]["images"][:1])
                if os.path.exists(b)] == [True] * sum(map(os.path.exists, kb[entity["id"]]["images"][:1]))
    output = root / "with_index.json"
    main(["eval", "--model", str(root / "model"), "--data", data, "--index", str(root / "index"), "--output", str(output)])
    assert json.loads(output.read_text())["mrr"] == pytest.approx(json.loads((root / "results.json").read_text())["mrr"])


def test_help_for_every_command():
    for command in ([], ["eval"], ["index"]):
        result = subprocess.run([sys.executable, "-m", "modeling_m3el.cli", *command, "--help"], capture_output=True,
                                text=True)
        assert result.returncode == 0 and "usage: m3el" in result.stdout


def test_bad_input_is_one_line_naming_it(saved, tmp_path, capsys):
    """A missing split, a folder that is not a benchmark, a model folder that is not one: one line that says what and
    where, exit status 1, no traceback; the data is read before the model is loaded."""
    root, data, model, processor = saved
    assert main(["eval", "--model", str(root / "model"), "--data", str(data), "--split", "nope"]) == 1
    error = capsys.readouterr().err
    assert "error:" in error and "split 'nope' is missing" in error and "Traceback" not in error
    assert main(["index", "--model", str(tmp_path / "absent"), "--data", str(tmp_path), "--output",
                 str(tmp_path / "index")]) == 1
    error = capsys.readouterr().err
    assert f"error: {tmp_path}: no entities.jsonl" in error and "Loading weights" not in error
    with pytest.raises(SystemExit, match="no such model folder: .*absent"):
        main(["eval", "--model", str(tmp_path / "absent"), "--data", str(data), "--split", "test"])
    with pytest.raises(SystemExit, match="cannot load an M3EL model and processor from .*"):  # a folder, not a model
        main(["eval", "--model", str(tmp_path), "--data", str(data), "--split", "test"])


def test_bad_sizes_are_one_line_before_anything_loads(saved, tmp_path):
    """--batch-size 0, --entity-batch-size 0, --num-workers -1 ended in tracebacks (a negative batch size in a
    misleading one): said first, in one line; gold_ranks refuses a batch size that is not positive."""
    root, data, model, processor = saved
    absent = str(tmp_path / "absent")  # neither the data nor the model is read: the sizes are said first
    for command in ("eval", "index"):
        arguments = [command, "--model", absent, "--data", absent]
        arguments += ["--output", absent] if command == "index" else []
        cases = [("--entity-batch-size", "0", "a positive integer, got 0"),
                 ("--entity-batch-size", "-4", "a positive integer, got -4"),
                 ("--num-workers", "-1", "0 or a positive integer, got -1")]
        if command == "eval":
            cases += [("--batch-size", "0", "a positive integer, got 0"),
                      ("--batch-size", "-2", "a positive integer, got -2")]
        for flag, value, message in cases:
            with pytest.raises(SystemExit, match=f"^error: {flag} must be {message}$"):
                main([*arguments, flag, value])
    benchmark = load_benchmark(data, splits=["test"])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), progress=False)
    for size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be a positive integer, got {size}"):
            gold_ranks(model, processor, index, benchmark.splits["test"], batch_size=size, progress=False)


def test_a_missing_or_broken_index_is_one_line(saved, tmp_path, capsys):
    """eval --index and link --index with a folder that is not there, or whose files are of two different saves:
    `error: ...`, exit status 1, no traceback."""
    root, data, model, processor = saved
    for command in (["eval", "--data", data], ["link", "--mention", "bank", "--sentence", "the river bank"]):
        arguments = [command[0], "--model", str(root / "model"), *command[1:]]
        with pytest.raises(SystemExit, match=r"^error: --index: no such folder: .*nonexistent$"):
            main([*arguments, "--index", str(tmp_path / "nonexistent")])
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(SystemExit, match=r"^error: --index: no entity index in .*empty: entity_index.json is "):
            main([*arguments, "--index", str(tmp_path / "empty")])
    benchmark = load_benchmark(data, splits=[])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), progress=False)
    index.save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "entity_index.json").read_text())
    (tmp_path / "index" / "entity_index.json").write_text(json.dumps(dict(meta, save_id="0" * 32)))
    different = r"^error: --index: .*come from different builds \(interrupted or concurrent save\?\)"
    with pytest.raises(SystemExit, match=different):
        main(["link", "--model", str(root / "model"), "--mention", "bank", "--sentence", "x", "--index",
              str(tmp_path / "index")])
    # through the command line: status 1, one line
    result = subprocess.run([sys.executable, "-m", "modeling_m3el.cli", "eval", "--model", str(root / "model"),
                             "--data", data, "--index", str(tmp_path / "nonexistent")], capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: --index: no such folder: {tmp_path / 'nonexistent'}"


def _write_kb(folder, entities):
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"id": i, "name": name, "description": text, "images": [image] if image else []})
             for i, name, text, image in entities]
    (folder / "entities.jsonl").write_text("\n".join(lines) + "\n")


def _png(path, colour):
    from PIL import Image

    Image.new("RGB", (12, 12), colour).save(path)
    return path.name


def test_index_update_encodes_only_what_changed(saved, tmp_path, capsys):
    root, _, model, processor = saved
    kb = tmp_path / "kb"
    kb.mkdir()
    entities = [(f"E{i}", f"name {i}", f"river bank {i}", _png(kb / f"e{i}.png", (40 * i, 0, 0)) if i % 3 else None)
                for i in range(1, 7)]
    _write_kb(kb, entities)
    command = ["index", "--model", str(root / "model"), "--data", str(kb), "--output", str(tmp_path / "index")]
    assert main(command + ["--update"]) == 0  # no index there yet: all encoded
    assert "(no index there yet: every entity encoded)" in capsys.readouterr().out
    # E2 leaves the KB, E3's description and E4's image change, E7 and E8 are new, and the order changes
    _png(kb / "e4.png", (0, 200, 0))
    entities = [entities[0], ("E3", "name 3", "river bank, now a city", None), entities[3], ("E8", "name 8",
                "city", _png(kb / "e8.png", (9, 9, 9))), entities[5], entities[4], ("E7", "name 7", "bank", None)]
    _write_kb(kb, entities)
    assert main(command + ["--update"]) == 0
    assert "(3 entities reused; 4 encoded: 2 new, 2 changed; 1 dropped)" in capsys.readouterr().out
    updated = EntityIndex.load(tmp_path / "index", model)
    rows = index_rows(load_benchmark(str(kb), splits=[]).entities)
    fresh = EntityIndex.build(model, processor, rows, progress=False)
    assert updated.entity_ids == fresh.entity_ids == ["E1", "E3", "E4", "E8", "E6", "E5", "E7"]
    for name, tensor in fresh.tensors.items():
        torch.testing.assert_close(updated.tensors[name], tensor, rtol=1e-5, atol=1e-5)
    assert main(command + ["--update"]) == 0  # nothing changed: nothing encoded
    assert "(7 entities reused; 0 encoded: 0 new, 0 changed; 0 dropped)" in capsys.readouterr().out
    # the digests name the encoding of the index they describe: the same index saved again still has them, but
    # another index saved without them (a run killed between the index and its digests) is not updated from them
    digests = json.loads((tmp_path / "index" / "kb_digests.json").read_text())
    assert digests["content_id"] == EntityIndex.load(tmp_path / "index").content_id is not None
    EntityIndex.load(tmp_path / "index").save(tmp_path / "index")
    assert main(command + ["--update"]) == 0
    assert "(7 entities reused; 0 encoded: 0 new, 0 changed; 0 dropped)" in capsys.readouterr().out
    digests = json.loads((tmp_path / "index" / "kb_digests.json").read_text())
    current = EntityIndex.load(tmp_path / "index")
    current.select(current.entity_ids[::-1]).save(tmp_path / "index")
    with pytest.raises(SystemExit, match="kb_digests.json does not belong to the index beside it"):
        main(command + ["--update"])
    current.save(tmp_path / "index")
    # digests written before the content id was kept name the index's save id then
    old = {key: value for key, value in digests.items() if key != "content_id"}
    (tmp_path / "index" / "kb_digests.json").write_text(json.dumps(dict(old, save_id=current.save_id)))
    assert main(command + ["--update"]) == 0
    assert "(7 entities reused;" in capsys.readouterr().out
    (tmp_path / "index" / "kb_digests.json").write_text(json.dumps(dict(old, save_id="another save")))
    with pytest.raises(SystemExit, match="kb_digests.json does not belong to the index beside it"):
        main(command + ["--update"])
    (tmp_path / "index" / "entity_index.json").write_text("{")
    with pytest.raises(SystemExit, match="--update: .*entity_index.json: not valid JSON.*; index without --update"):
        main(command + ["--update"])
    assert main(command) == 0  # without --update: all encoded anew
    capsys.readouterr()
    # another model's index is not updated, it is refused; so is an index whose digests are gone
    other = root / "other-model"
    torch.manual_seed(1)
    M3ELModel(tiny_config(processor)).save_pretrained(other)
    processor.save_pretrained(other)
    with pytest.raises(SystemExit, match="--update: .*built with another model"):
        main(["index", "--model", str(other), "--data", str(kb), "--output", str(tmp_path / "index"), "--update"])
    (tmp_path / "index" / "kb_digests.json").unlink()
    with pytest.raises(SystemExit, match="kb_digests.json cannot be read"):
        main(command + ["--update"])


def test_eval_among_candidates_reports_what_the_pipeline_would_link(saved, capsys):
    root, data, model, processor = saved
    output = root / "among.json"
    arguments = ["eval", "--model", str(root / "model"), "--data", data, "--split", "test"]
    assert main([*arguments, "--candidates", "4", "--output", str(output)]) == 0
    results = json.loads(output.read_text())
    benchmark = load_benchmark(data, splits=["test"])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), progress=False)
    ranks = gold_ranks(model, processor, index, benchmark.splits["test"], progress=False, candidates=4)
    assert ranks.max() <= len(index) and ((ranks <= 4) | (ranks == len(index))).all()
    assert results["candidates"] == 4
    assert results["gold_among_candidates"] == pytest.approx(float((ranks <= 4).mean()))
    for key, value in ranking_metrics(ranks).items():
        assert results[key] == pytest.approx(value), key
    capsys.readouterr()
    assert main([*arguments, "--candidates", "100000", "--output", str(output)]) == 0  # the whole KB: exact ranks
    results = json.loads(output.read_text())
    assert "candidates" not in results
    assert results["mrr"] == pytest.approx(json.loads((root / "results.json").read_text())["mrr"])
    with pytest.raises(SystemExit, match="--candidates must be a positive integer"):
        main([*arguments, "--candidates", "0"])


def test_an_update_takes_each_entitys_rows_from_where_they_are():
    """`m3el index --update` assembles the new index in one pass (each tensor allocated once): rows reused from the
    previous index, rows encoded anew, in the KB's new order, equal to selecting and concatenating."""
    from modeling_m3el.cli import _updated_index

    torch.manual_seed(0)
    previous = EntityIndex({"a": torch.randn(6, 3), "b": torch.randn(6, 2, 4)}, [f"E{i}" for i in range(6)], "fp", "16")
    encoded = EntityIndex({"a": torch.randn(2, 3), "b": torch.randn(2, 2, 4)}, ["N1", "E3"], "fp", "16")
    order = ["E5", "N1", "E0", "E3", "E2"]  # E1 and E4 dropped, E3 changed, N1 new
    updated = _updated_index(previous, ["E5", "E0", "E2"], encoded, order)
    expected = EntityIndex.concat([previous.select(["E5", "E0", "E2"]), encoded]).select(order)
    assert updated.entity_ids == order and (updated.fingerprint, updated.float16_fingerprint) == ("fp", "16")
    for name, tensor in expected.tensors.items():
        assert torch.equal(updated.tensors[name], tensor), name
    assert updated.content_id not in (previous.content_id, encoded.content_id)
    # nothing encoded: a reorder or a drop is a new index; the same entities in the same order are the same encoding
    dropped = _updated_index(previous, ["E4", "E0"], None, ["E4", "E0"])
    assert torch.equal(dropped.tensors["b"], previous.tensors["b"][[4, 0]])
    assert _updated_index(previous, previous.entity_ids, None, previous.entity_ids).content_id == previous.content_id


def test_a_pipeline_saved_from_an_m3el_index_folder_carries_its_entity_images(saved, tmp_path):
    """`m3el index` writes absolute image paths into entities.jsonl; a pipeline saved from that folder copies those
    images into itself and references the copies, so the saved folder shows them on another machine."""
    from modeling_m3el.pipeline_m3el import LOCAL_IMAGE_FOLDER, M3ELEntityLinkingPipeline, load_entities

    root, data, model, processor = saved
    assert main(["index", "--model", str(root / "model"), "--data", data, "--output", str(tmp_path / "index")]) == 0
    written = load_entities(tmp_path / "index" / "entities.jsonl")
    sources = {e["id"]: e["images"] for e in written}
    assert any(sources.values()) and all(os.path.isabs(i) for images in sources.values() for i in images)
    linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=str(tmp_path / "index"), device="cpu")
    linker.save_pretrained(tmp_path / "saved")
    copies = {e["id"]: e["images"] for e in load_entities(tmp_path / "saved" / "entities.jsonl")}
    assert copies.keys() == sources.keys()
    for entity_id, images in copies.items():
        assert len(images) == len(sources[entity_id])
        for copy, source in zip(images, sources[entity_id]):
            assert copy.startswith(f"{LOCAL_IMAGE_FOLDER}/")
            assert (tmp_path / "saved" / copy).read_bytes() == open(source, "rb").read()
    # loaded from the saved folder, results show the copies
    again = M3ELEntityLinkingPipeline(model=model, processor=processor, index=str(tmp_path / "saved"), device="cpu")
    shown = again.describe(next(i for i, images in copies.items() if images))["image"]
    assert shown.startswith(str(tmp_path / "saved")) and os.path.isfile(shown)
    # opting out: every reference written as it is held
    linker.save_pretrained(tmp_path / "referenced", entity_images="reference")
    assert {e["id"]: e["images"] for e in load_entities(tmp_path / "referenced" / "entities.jsonl")} == sources
    assert not (tmp_path / "referenced" / "entity_images").exists()
    with pytest.raises(ValueError, match="entity_images must be 'copy' or 'reference'"):
        linker.save_pretrained(tmp_path / "other", entity_images="thumbnail")


def test_saved_entity_images_are_copied_once_and_the_ones_missing_said_once(saved, tmp_path):
    """Metadata records as dicts: an image shared by two entities is copied once; a single `image` is copied like
    `images`; a missing absolute path, referenced twice, is one missing image in the warning, kept as it is; a
    relative path with no KB folder to find it in is said too."""
    from modeling_m3el.pipeline_m3el import LOCAL_IMAGE_FOLDER, M3ELEntityLinkingPipeline, load_entities

    root, data, model, processor = saved
    index = EntityIndex.build(model, processor, index_rows(load_benchmark(data, splits=[]).entities), progress=False)
    image = next(path for path in load_benchmark(data, splits=[]).entities["images"] if path)[0]
    ids = index.entity_ids
    records = [{"id": ids[0], "name": "a", "images": [image]}, {"id": ids[1], "name": "b", "images": [image]},
               {"id": ids[2], "name": "c", "image": image}, {"id": ids[3], "name": "d", "images": ["/gone/x.jpg"]},
               {"id": ids[4], "name": "e", "images": ["/gone/x.jpg", "relative/y.jpg"]}]
    with pytest.warns(UserWarning, match=f"{len(ids) - 5} indexed entities have no metadata"):
        linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=index, entities=records,
                                           device="cpu")
    with pytest.warns(UserWarning, match=r"2 entity images .* not copied .*no KB folder is known.*'/gone/x.jpg', "
                      r"'relative/y.jpg'"):
        linker.save_pretrained(tmp_path / "saved")
    saved_images = [e["images"] for e in load_entities(tmp_path / "saved" / "entities.jsonl")]
    copy = saved_images[0][0]
    assert copy.startswith(f"{LOCAL_IMAGE_FOLDER}/") and saved_images[:3] == [[copy]] * 3
    assert saved_images[3:] == [["/gone/x.jpg"], ["/gone/x.jpg", "relative/y.jpg"]]
    assert os.listdir(tmp_path / "saved" / LOCAL_IMAGE_FOLDER) == [os.path.basename(copy)]
    assert (tmp_path / "saved" / copy).read_bytes() == open(image, "rb").read()


def test_m3el_link_reads_the_results_metadata_and_says_what_is_missing(saved, tmp_path, capsys):
    """`m3el link` parses only the lines of entities.jsonl that can hold its results (a damaged line elsewhere is not
    read), says which results have no metadata, and checks --entities before the model loads. A pipeline that read a
    part of the file saves all of it."""
    from modeling_m3el.pipeline_m3el import M3ELEntityLinkingPipeline, load_entities

    root, data, model, processor = saved
    assert main(["index", "--model", str(root / "model"), "--data", data, "--output", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    arguments = ["link", "--model", str(root / "model"), "--index", str(tmp_path / "index"), "--mention", "bank",
                 "--sentence", "the river bank", "--top-k", "3", "--device", "cpu", "--json"]
    assert main(arguments) == 0
    results = json.loads(capsys.readouterr().out)
    everything = {e["id"]: e for e in load_entities(tmp_path / "index" / "entities.jsonl")}
    assert [(e["name"], e["description"]) for e in results] == [
        (everything[e["id"]]["name"], everything[e["id"]]["description"]) for e in results]
    # a copy of the metadata with a damaged line, and without the first result's record
    lines = (tmp_path / "index" / "entities.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if json.loads(line)["id"] != results[0]["id"]]
    (tmp_path / "partial.jsonl").write_text("\n".join(["{damaged", *kept]) + "\n", encoding="utf-8")
    assert main([*arguments, "--entities", str(tmp_path / "partial.jsonl")]) == 0
    captured = capsys.readouterr()
    partial = json.loads(captured.out)
    assert partial[0]["name"] is None and [e["name"] for e in partial[1:]] == [e["name"] for e in results[1:]]
    assert f"warning: 1 of the 3 entities found have no metadata in {tmp_path / 'partial.jsonl'}" in captured.err
    with pytest.raises(SystemExit, match="error: --entities .*absent.jsonl: no such file"):
        main([*arguments[:1], "--model", str(tmp_path / "no-model"), *arguments[3:], "--entities",
              str(tmp_path / "absent.jsonl")])
    # a pipeline that read the results' records only saves every entity's
    linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=str(tmp_path / "index"), entities=[],
                                       device="cpu")
    linker.set_entities(tmp_path / "index" / "entities.jsonl", ids=[e["id"] for e in results])
    assert len(linker.entities) == 3
    linker.save_pretrained(tmp_path / "saved", entity_images="reference")
    assert {e["id"]: e for e in load_entities(tmp_path / "saved" / "entities.jsonl")} == everything
