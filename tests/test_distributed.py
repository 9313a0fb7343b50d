"""In-batch negatives gathered across processes: 2 CPU processes of batch b train exactly like 1 process of batch 2b."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "gathered_negatives.py"


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    output = tmp_path_factory.mktemp("distributed") / "results.json"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), str(output),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("mode", ["text_to_image", "bidirectional"])
def test_two_processes_equal_one_process_with_double_batch(two_process_results, mode):
    result = two_process_results[mode]
    assert result["world_size"] == 2
    assert result["logits_shape"] == [3, 6]  # local mentions against the entities of both processes
    assert result["loss_distributed"] == pytest.approx(result["loss_single"], rel=1e-12)
    assert result["missing"] == [] and result["num_parameters_compared"] > 100
    assert result["worst_relative_grad_difference"] < 1e-6


def test_gather_negatives_is_a_no_op_in_one_process():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from gathered_negatives import build
    finally:
        sys.path.pop(0)
    model, batch = build("text_to_image")
    with torch.no_grad():
        plain = model(**batch, return_loss=True)
        gathered = model(**batch, return_loss=True, gather_negatives=True)
    assert torch.equal(plain.logits, gathered.logits) and torch.equal(plain.loss, gathered.loss)
