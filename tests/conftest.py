"""Shared fixtures: a demo M3EL trained once per session by train_accelerate.py, and the folder it is published as."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prepended to code run in a fresh interpreter: blocks any import of this package (an editable install makes it
# importable everywhere), so that only the code saved in a model folder can run.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "modeling_m3el" or name.startswith("modeling_m3el."):
                raise ImportError("modeling_m3el is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    """
)


def run_without_package(code: str, *args: str, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh offline interpreter that cannot import modeling_m3el; fails the test if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", BLOCK_PACKAGE + code, *args], capture_output=True, text=True,
                            env=env, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def skip_unless_triton_interprets() -> None:
    """Skip a test of the fused kernels in Triton's interpreter where Triton is missing, or where its interpreter
    fails on this numpy: Triton 3.6 and older turn a program id into an index with a conversion numpy 2.4 refuses
    ("only 0-dimensional arrays can be converted to Python scalars"; 3.7 and newer, or numpy 2.3, run the tests). The
    compiled kernels do not use numpy."""
    triton = pytest.importorskip("triton")
    import numpy

    from modeling_m3el.kernels_m3el import major_minor

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        pytest.skip(f"Triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__}")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    from modeling_m3el.demo import write_demo_benchmark

    return write_demo_benchmark(tmp_path_factory.mktemp("demo_data") / "demo", train=300, dev=60, test=60)


@pytest.fixture(scope="session")
def demo_run(demo_data, tmp_path_factory) -> Path:
    """A training run's output folder (model/, log.jsonl): the demo recipe, 4 epochs on 300 mentions."""
    out = tmp_path_factory.mktemp("demo_run") / "run"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_accelerate.py"), "--dataset_dir", demo_data, "--output_dir", str(out),
         "--num_epochs", "4", "--eval_every_epochs", "2"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    return out


@pytest.fixture(scope="session")
def hub_folder(demo_run, tmp_path_factory) -> Path:
    """The run's publishable folder, built with `m3el export`."""
    from modeling_m3el.cli import main

    folder = tmp_path_factory.mktemp("hub") / "m3el-demo"
    assert main(["export", "--run", str(demo_run), "--output", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def test_mentions(demo_data) -> list[dict]:
    """The demo's test mentions as pipeline inputs, with their gold entity (`answer`)."""
    from modeling_m3el.data import load_benchmark

    split = load_benchmark(demo_data, splits=["test"]).splits["test"]
    return [{"mention": row["mention"], "text": row["sentence"], "image": row["image"], "answer": row["answer"]}
            for row in split]
