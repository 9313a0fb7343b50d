"""The `m3el` command: eval and index on a saved model and a benchmark folder give what the library computes."""

import json
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
    output = root / "with_index.json"
    main(["eval", "--model", str(root / "model"), "--data", data, "--index", str(root / "index"), "--output", str(output)])
    assert json.loads(output.read_text())["mrr"] == pytest.approx(json.loads((root / "results.json").read_text())["mrr"])


def test_help_for_every_command():
    for command in ([], ["eval"], ["index"]):
        result = subprocess.run([sys.executable, "-m", "modeling_m3el.cli", *command, "--help"], capture_output=True,
                                text=True)
        assert result.returncode == 0 and "usage: m3el" in result.stdout
