"""The publishable folder of a training run, and its push: the exact files it would upload, and the Hub calls the push
makes (recorded, no network)."""

import json
import shutil
import warnings
from pathlib import Path

import pytest
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from modeling_m3el.cli import main
from modeling_m3el.data import load_benchmark
from modeling_m3el.evaluation import index_rows
from modeling_m3el.publish import HUB_IGNORE_PATTERNS, build_hub_folder, hub_files, push_to_hub

FIXED_FILES = {
    "README.md", "config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
    "configuration_m3el.py", "modeling_m3el.py", "kernels_m3el.py", "processing_m3el.py", "index_m3el.py",
    "pipeline_m3el.py",
    "entity_index.safetensors", "entity_index.json", "entities.jsonl", "examples.jsonl", "handler.py",
    "test_results.json", "training_config.json", "log.jsonl", "plots/hits_at_k.png", "plots/training_curves.png",
}


def expected_files(demo_data) -> list[str]:
    """What the demo run's folder must hold: the fixed files, one thumbnail per entity with a readable first image,
    and three example mentions."""
    rows = index_rows(load_benchmark(demo_data, splits=[]).entities)
    thumbnails = {f"entity_images/{number:06d}.jpg" for number, row in enumerate(rows) if row["image"]}
    examples = {f"examples/{i}.jpg" for i in range(3)}
    return sorted(FIXED_FILES | thumbnails | examples)


class RecordingApi:
    """Stands in for HfApi: records create_repo and upload_folder, and what upload_folder would send."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("HfApi", {"token": token}))

    def create_repo(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, **kwargs):
        # The files upload_folder sends: its listing, filtered by the given and its default ignore patterns.
        folder = kwargs["folder_path"]
        listed = sorted(p.relative_to(folder).as_posix() for p in Path(folder).glob("**/*") if p.is_file())
        sent = sorted(filter_repo_objects(listed, ignore_patterns=kwargs["ignore_patterns"] + DEFAULT_IGNORE_PATTERNS))
        RecordingApi.calls.append(("upload_folder", {**kwargs, "sent": sent}))

        class Commit:
            commit_url = f"https://huggingface.co/{kwargs['repo_id']}/commit/0"

        return Commit()


@pytest.fixture
def recording(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", RecordingApi)
    return RecordingApi.calls


def test_the_folder_holds_exactly_the_expected_files(hub_folder, demo_data):
    assert hub_files(hub_folder) == expected_files(demo_data)
    entities = [json.loads(line) for line in (hub_folder / "entities.jsonl").open()]
    index = json.loads((hub_folder / "entity_index.json").read_text())
    assert [e["id"] for e in entities] == index["entity_ids"] and len(entities) == 160
    # Entity images are references into the folder, never paths of the training machine.
    assert all(image.startswith("entity_images/") for e in entities for image in e["images"])
    examples = [json.loads(line) for line in (hub_folder / "examples.jsonl").open()]
    assert [e["image"] for e in examples] == [f"examples/{i}.jpg" for i in range(3)]
    assert (hub_folder / "handler.py").read_text().startswith('"""Inference Endpoints')


@pytest.fixture(scope="module")
def repo_folder(hub_folder, tmp_path_factory):
    """The published folder as `m3el export --repo-id me/m3el-demo` writes it: its card loads the repo."""
    folder = tmp_path_factory.mktemp("for_repo") / "m3el-demo"
    shutil.copytree(hub_folder, folder)
    card = folder / "README.md"
    card.write_text(card.read_text().replace(f'"{hub_folder}"', '"me/m3el-demo"'))
    return folder


def test_dry_run_lists_the_files_and_touches_nothing(repo_folder, hub_folder, recording):
    assert push_to_hub(repo_folder, "me/m3el-demo", dry_run=True) == hub_files(hub_folder)
    assert recording == []


def test_a_card_written_for_another_repo_or_a_local_folder_is_not_pushed(repo_folder, hub_folder, recording):
    with pytest.raises(ValueError, match="written for me/m3el-demo .*not for you/other: build the folder again"):
        push_to_hub(repo_folder, "you/other", dry_run=True)
    with pytest.raises(ValueError, match=f"written for {hub_folder} "):  # built without --repo-id
        push_to_hub(hub_folder, "me/m3el-demo", dry_run=True)
    assert recording == []


def test_the_training_machines_paths_are_not_published(demo_run, demo_data, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    config_path = run / "model" / "training_config.json"
    config = json.loads(config_path.read_text())
    config.update(dataset_dir=str(Path(demo_data).resolve()), output_dir="/home/someone/runs/m3el-wikimel",
                  clip="/home/someone/models/clip-vit-base-patch32")
    config_path.write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = build_hub_folder(run, tmp_path / "built", repo_id="me/m3el-demo")
    # the thumbnails are in the folder before the pipeline saves into it: nothing is said to be missing
    assert not [w for w in caught if "not copied" in str(w.message)], [str(w.message) for w in caught]
    published = json.loads((Path(folder) / "training_config.json").read_text())
    assert (published["dataset_dir"], published["output_dir"], published["clip"]) == (
        Path(demo_data).resolve().name, "m3el-wikimel", "clip-vit-base-patch32")
    for path in Path(folder).rglob("*"):
        if path.is_file() and path.suffix in (".md", ".json", ".jsonl", ".py"):
            text = path.read_text()
            assert "/home/someone" not in text and str(Path(demo_data).resolve()) not in text, path


def test_push_creates_the_repo_and_uploads_exactly_the_listed_files(repo_folder, hub_folder, recording, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(repo_folder, folder)
    # Leftovers that must not travel: an interrupted write, Python caches, a git folder.
    (folder / "model.safetensors.tmp").write_bytes(b"partial")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "pipeline_m3el.cpython-311.pyc").write_bytes(b"")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    listed = push_to_hub(folder, "me/m3el-demo", dry_run=True)
    assert listed == hub_files(hub_folder)

    push_to_hub(folder, "me/m3el-demo", private=True, commit_message="Demo linker", token="hf_test")
    assert [name for name, _ in recording] == ["HfApi", "create_repo", "upload_folder"]
    assert recording[0][1] == {"token": "hf_test"}
    assert recording[1][1] == {"repo_id": "me/m3el-demo", "repo_type": "model", "private": True, "exist_ok": True}
    upload = recording[2][1]
    assert upload["repo_id"] == "me/m3el-demo" and upload["repo_type"] == "model"
    assert upload["folder_path"] == str(folder) and upload["commit_message"] == "Demo linker"
    assert upload["ignore_patterns"] == HUB_IGNORE_PATTERNS
    assert upload["sent"] == listed


def test_push_refuses_a_folder_that_was_not_built(demo_run, recording):
    with pytest.raises(ValueError, match="not a built M3EL folder"):
        push_to_hub(demo_run / "model", "me/m3el-demo")
    assert recording == []


def test_build_refuses_a_non_empty_output(demo_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        build_hub_folder(demo_run, tmp_path)
    with pytest.raises(ValueError, match="entity_images"):
        build_hub_folder(demo_run, tmp_path / "new", entity_images="all")


def test_cli_push_of_a_run_builds_then_pushes(demo_run, demo_data, recording, capsys, tmp_path, monkeypatch):
    assert main(["push", str(demo_run), "--repo-id", "me/m3el-demo", "--private", "--dry-run",
                 "--build-dir", str(tmp_path / "built")]) == 0
    out = capsys.readouterr().out
    assert "Would create private model repo me/m3el-demo" in out
    assert [line.strip() for line in out.splitlines()[1:]] == expected_files(demo_data)
    assert recording == []
    # Built for the repo: the card's snippets load it.
    assert 'model="me/m3el-demo"' in (tmp_path / "built" / "README.md").read_text()

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no token saved by a login either
    with pytest.raises(SystemExit, match="no Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --token"):
        main(["push", str(tmp_path / "built"), "--repo-id", "me/m3el-demo"])
    with pytest.raises(SystemExit, match="error: the model card in .* was written for me/m3el-demo"):
        main(["push", str(tmp_path / "built"), "--repo-id", "you/other", "--token", "hf_test"])
    assert recording == []
    assert main(["push", str(tmp_path / "built"), "--repo-id", "me/m3el-demo", "--commit-message", "v1",
                 "--token", "hf_test"]) == 0
    assert [name for name, _ in recording] == ["HfApi", "create_repo", "upload_folder"]
    assert recording[1][1]["private"] is False and recording[2][1]["commit_message"] == "v1"
    assert recording[2][1]["sent"] == expected_files(demo_data)
    assert "Pushed" in capsys.readouterr().out


def test_help_of_the_new_commands():
    for command in ("link", "export", "push"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0


def test_export_and_push_check_their_counts_first(tmp_path):
    for command in (["export", "--run", str(tmp_path / "run"), "--output", str(tmp_path / "out")],
                    ["push", str(tmp_path / "run"), "--repo-id", "me/m3el-demo", "--dry-run"]):
        with pytest.raises(SystemExit, match="--examples must be 0 or a positive integer, got -1"):
            main([*command, "--examples", "-1"])
        with pytest.raises(SystemExit, match="--num-workers must be 0 or a positive integer, got -2"):
            main([*command, "--num-workers", "-2"])


def test_export_needs_the_kb_only_and_takes_examples_from_a_test_split_if_any(demo_run, demo_data, tmp_path):
    """A release-layout folder with only its KB and test split publishes with examples; without the test split,
    without; a damaged test split is an error, not skipped."""
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)
    for split in ("train", "dev"):
        (data / f"WIKIMEL_{split}.json").unlink()
    folder = Path(build_hub_folder(demo_run, tmp_path / "with_test", data_dir=str(data), repo_id="me/m3el-demo"))
    assert len((folder / "examples.jsonl").read_text().splitlines()) == 3
    test_file = data / "WIKIMEL_test.json"
    test_file.write_bytes(b"[\xff")
    from modeling_m3el.data import MELDataError

    with pytest.raises(MELDataError, match="WIKIMEL_test.json.*not UTF-8"):
        build_hub_folder(demo_run, tmp_path / "broken", data_dir=str(data), repo_id="me/m3el-demo")
    test_file.unlink()
    folder = Path(build_hub_folder(demo_run, tmp_path / "kb_only", data_dir=str(data), repo_id="me/m3el-demo"))
    assert not (folder / "examples.jsonl").exists() and (folder / "entity_index.json").is_file()
