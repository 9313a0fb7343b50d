"""The model card: loads back with ModelCard.load holding the run's numbers, Hub-valid metadata, plots that exist and
are embedded, and usage snippets that run as written in a fresh process without the package."""

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_without_package
from huggingface_hub import ModelCard
from PIL import Image

from modeling_m3el.model_card import CITATION, PIPELINE_TAG, model_card


def python_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_card_loads_back_with_the_runs_numbers(hub_folder):
    card = ModelCard.load(hub_folder / "README.md")
    results = json.loads((hub_folder / "test_results.json").read_text())
    data = card.data
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    # The Hub's pipeline_tag must be one of its tasks; none is entity linking, so "other"; the task is a tag.
    assert data.pipeline_tag == PIPELINE_TAG == "other"
    assert "multimodal-entity-linking" in data.tags and "custom_code" in data.tags
    assert data.base_model is None  # the demo starts from a tiny CLIP built from code, not a Hub model
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    assert values == {
        "mrr": results["mrr"], "mean_rank": results["mr"], **{f"hits_at_{k}": results[f"hits@{k}"] for k in
                                                               (1, 3, 5, 10, 20)},
    }
    assert {result.dataset_name for result in data.eval_results} == {"m3el-demo"}
    assert {result.dataset_split for result in data.eval_results} == {"test"}
    assert data.model_name == "M3EL (m3el-demo)"
    # The numbers are in the text too, with the recipe, the limitations and the citation.
    assert f"| Hits@1 | {results['hits@1']:.4f} |" in card.text
    assert f"| MRR | {results['mrr']:.4f} |" in card.text
    assert f"{results['count']} mentions" in card.text and "against all 160 entities" in card.text
    assert "| `learning_rate` | `0.001` |" in card.text and "| `num_epochs` | `4` |" in card.text
    assert "## Limitations" in card.text and "no NIL" in card.text and "demo model" in card.text
    assert CITATION in card.text and "2412.10440" in card.text and "Jeff Z." in card.text


def test_plots_exist_and_are_embedded(hub_folder):
    card = ModelCard.load(hub_folder / "README.md")
    for name in ("plots/hits_at_k.png", "plots/training_curves.png"):
        assert f"]({name})" in card.text
        with Image.open(hub_folder / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_python_snippets_run_as_written(hub_folder, tmp_path):
    snippets = python_snippets((hub_folder / "README.md").read_text())
    assert len(snippets) == 2
    assert all(f'"{hub_folder}"' in snippet for snippet in snippets)  # the folder's own place: as written
    example = json.loads((hub_folder / "examples.jsonl").read_text().splitlines()[0])
    pipeline_output = run_without_package(snippets[0], cwd=tmp_path).stdout.strip().splitlines()
    assert [line.split()[0] for line in pipeline_output] == ["1", "2", "3"]
    ids = {json.loads(line)["id"] for line in (hub_folder / "entities.jsonl").open()}
    assert all(line.split()[1] in ids for line in pipeline_output)
    scores = run_without_package(snippets[1], cwd=tmp_path).stdout
    assert scores.startswith("tensor([[") and example["mention"] in snippets[1]


def test_card_of_a_plain_training_run_and_the_make_card_script(demo_run, tmp_path):
    """What train_accelerate.py would write into model/: no index, so no pipeline snippet; the run's log found."""
    model_dir = tmp_path / "model"
    shutil.copytree(demo_run / "model", model_dir)
    shutil.copyfile(demo_run / "log.jsonl", tmp_path / "log.jsonl")
    card = model_card(model_dir, plots=False, dataset_name="m3el-demo")
    assert "pipeline(" not in card.text and "AutoModel.from_pretrained" in card.text
    assert "![" not in card.text
    results = json.loads((model_dir / "test_results.json").read_text())
    assert results["best_step"] > 0 and results["best_epoch"] >= 0
    assert (f"best dev MRR at optimiser step {results['best_step']}, in epoch {results['best_epoch'] + 1} (counted "
            "from 1)") in card.text
    # results of a run before the best step was kept: the epoch alone
    (model_dir / "test_results.json").write_text(json.dumps({k: v for k, v in results.items() if k != "best_step"}))
    older = model_card(model_dir, plots=False, dataset_name="m3el-demo")
    assert f"best dev MRR after epoch {results['best_epoch'] + 1} (counted from 1)" in older.text
    (model_dir / "test_results.json").write_text(json.dumps(results))
    result = subprocess.run([sys.executable, str(ROOT / "hub_card" / "make_card.py"), str(model_dir), "--model-id",
                             "me/m3el-demo"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = ModelCard.load(model_dir / "README.md")
    assert 'AutoModel.from_pretrained("me/m3el-demo"' in written.text
    assert (model_dir / "plots" / "training_curves.png").is_file()  # the log next to model/ was found


@pytest.mark.parametrize("clip, expected", [("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
                                            ("/data/clip-local", None)])
def test_base_model_is_a_hub_id_or_nothing(clip, expected):
    from modeling_m3el.model_card import card_data

    data = card_data({"mrr": 0.5, "hits@1": 0.4}, {"clip": clip}, "M3EL (WikiMEL)", "WikiMEL", dataset_id=None)
    assert data.base_model == expected and data.datasets is None
    assert [r.metric_type for r in data.eval_results] == ["mrr", "hits_at_1"]


def test_the_command_line_snippet_runs_as_written(hub_folder, capsys):
    import shlex

    from modeling_m3el.cli import main

    command = next(line for line in (hub_folder / "README.md").read_text().splitlines() if line.startswith("m3el link"))
    example = json.loads((hub_folder / "examples.jsonl").read_text().splitlines()[0])
    assert main(shlex.split(command)[1:]) == 0
    first = capsys.readouterr().out.splitlines()[0].split()
    assert first[0] == "1" and first[3] == example["answer"]  # the example's gold entity, ranked first
