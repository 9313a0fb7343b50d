"""train_accelerate.py end to end on a small demo: the output folder, 2 processes = 1 process with the doubled batch,
and a run killed at any point resumes to the same weights and metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_m3el.demo import write_demo_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train_accelerate.py"
SMALL = ["--per_device_batch_size", "16", "--eval_batch_size", "64", "--adam_epsilon", "1e-4"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_benchmark(tmp_path_factory.mktemp("demo"), seed=3, train=200, dev=40, test=40)


def launch(args, processes=1, wait=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--num_processes", str(processes)]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        command.append("--multi_gpu")
    command += [str(SCRIPT), *args]
    if not wait:  # its own process group, so that a kill reaches the launcher's workers too
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    return result


def test_demo_run_writes_a_complete_model_folder(demo, tmp_path):
    out = tmp_path / "run"
    result = launch(["--dataset_dir", demo, "--output_dir", str(out), "--num_epochs", "2", "--eval_every_epochs", "1",
                     *SMALL])
    from modeling_m3el.data import load_benchmark

    test_mentions = len(load_benchmark(demo, splits=["test"]).splits["test"])  # 40 less the nil answers
    assert f"Test ({test_mentions} mentions vs 160 entities): mr" in result.stdout
    model = out / "model"
    files = {p.name for p in model.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_m3el.py", "configuration_m3el.py", "processing_m3el.py",
            "processor_config.json", "tokenizer.json", "README.md", "test_results.json", "training_config.json"} <= files
    results = json.loads((model / "test_results.json").read_text())
    assert set(results) >= {"mr", "mrr", "hits@1", "hits@3", "hits@5", "hits@10", "hits@20"}
    assert results["count"] == test_mentions
    assert 1 <= results["mr"] <= 160 and 0 < results["mrr"] <= 1
    assert results["hits@1"] <= results["hits@3"] <= results["hits@20"] <= 1
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in logged) and any("val/mrr" in row for row in logged)
    assert any("test/mrr" in row for row in logged)
    assert json.loads((model / "training_config.json").read_text())["num_epochs"] == 2
    # The resolved config travels with every checkpoint too.
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert checkpoints and all((c / "training_config.json").exists() for c in checkpoints)
    assert "m3el-demo" in (model / "README.md").read_text()


def _checkpoint_weights(out: Path, step: int) -> dict:
    return load_file(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def test_two_processes_train_like_one_with_the_doubled_batch(demo, tmp_path):
    common = ["--dataset_dir", demo, "--num_epochs", "1", "--max_train_steps", "3", "--eval_batch_size", "64",
              "--adam_epsilon", "1e-4"]
    launch([*common, "--output_dir", str(tmp_path / "one"), "--per_device_batch_size", "16"], processes=1)
    launch([*common, "--output_dir", str(tmp_path / "two"), "--per_device_batch_size", "8"], processes=2)
    one, two = _checkpoint_weights(tmp_path / "one", 3), _checkpoint_weights(tmp_path / "two", 3)
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        if name.endswith("k_proj.bias"):  # CLIP initialises them at 0
            # The true gradient of a key bias is 0 (softmax ignores a shift shared by all keys): both runs move it
            # by rounding noise only, differently. It must stay at noise level.
            assert tensor.abs().max() < 1e-4 and two[name].abs().max() < 1e-4, name
            continue
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=2e-6, msg=name)
    loss = {}
    for run in ("one", "two"):
        rows = [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
        loss[run] = next(row["train/loss"] for row in rows if "train/loss" in row)
    assert loss["two"] == pytest.approx(loss["one"], rel=1e-5)


def _resume_args(demo):
    return ["--dataset_dir", demo, "--num_epochs", "3", "--eval_every_epochs", "1", "--checkpointing_steps", "4",
            *SMALL]


@pytest.fixture(scope="module")
def straight(demo, tmp_path_factory):
    """An uninterrupted run, which killed or crashed runs must resume to."""
    out = tmp_path_factory.mktemp("straight")
    launch([*_resume_args(demo), "--output_dir", str(out)])
    return out


def _assert_same_result(resumed: Path, straight: Path):
    expected, weights = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" /
                                                                                       "model.safetensors")
    assert expected.keys() == weights.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    assert json.loads((resumed / "test_results.json").read_text()) == json.loads(
        (straight / "test_results.json").read_text())


def test_killed_run_resumes_to_the_same_result(demo, straight, tmp_path):
    args = _resume_args(demo)
    killed = tmp_path / "killed"
    process = launch([*args, "--output_dir", str(killed)], wait=False)
    deadline = time.time() + 600
    # Kill it hard once it has written a mid-epoch checkpoint (step 4 is inside the first epoch of 12 batches).
    while time.time() < deadline and not (killed / "checkpoints" / "step_00000008").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert not (killed / "model").exists()
    launch([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"])
    _assert_same_result(killed, straight)


# train_accelerate.py with its dev evaluation failing on the epoch given as the first argument, or (epoch -1) with
# the first write of best_model failing.
FAILING_EVALUATION = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import train_accelerate

real, real_save = train_accelerate.evaluate_split, train_accelerate.save_model_folder
failing_epoch = int(sys.argv.pop(1))
calls = []

def evaluate_split(accelerator, model, processor, benchmark, split, config):
    calls.append(split)
    if split == "dev" and calls.count("dev") == failing_epoch + 1:
        raise RuntimeError("simulated out-of-memory error in the dev evaluation")
    return real(accelerator, model, processor, benchmark, split, config)

def save_model_folder(model, processor, folder, extra_files=None):
    if failing_epoch == -1 and folder.endswith("best_model"):
        raise RuntimeError("simulated crash before best_model is written")
    return real_save(model, processor, folder, extra_files)

train_accelerate.evaluate_split = evaluate_split
train_accelerate.save_model_folder = save_model_folder
train_accelerate.main(sys.argv[1:])
"""


def test_a_run_failing_in_its_dev_evaluation_keeps_the_epoch_and_resumes_to_the_same_result(demo, straight, tmp_path):
    """The epoch's checkpoint is taken before its dev evaluation: a run failing there (out of memory, say) loses no
    training; resumed, it evaluates that epoch first, logs its dev metrics once, and ends as the uninterrupted run."""
    crashed = tmp_path / "crashed"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", FAILING_EVALUATION, str(ROOT), "1", *_resume_args(demo),
                             "--output_dir", str(crashed)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "simulated out-of-memory error" in result.stderr, result.stderr[-3000:]
    # 12 batches an epoch: epoch 1 ended at step 24, and its checkpoint holds it, its evaluation owed.
    assert [path.name for path in sorted((crashed / "checkpoints").iterdir())] == ["step_00000020", "step_00000024"]
    state = torch.load(crashed / "checkpoints" / "step_00000024" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["eval_due"] == 1 and [row["epoch"] for row in state["history"]] == [0]
    # resumed into another output_dir: the checkpoint it came from is left as it was, the evaluated state saved there
    elsewhere = tmp_path / "elsewhere"
    launch([*_resume_args(demo), "--output_dir", str(elsewhere), "--resume_from_checkpoint",
            str(crashed / "checkpoints" / "step_00000024")])
    _assert_same_result(elsewhere, straight)
    assert torch.load(crashed / "checkpoints" / "step_00000024" / "custom_checkpoint_0.pkl",
                      weights_only=False) == state
    assert torch.load(elsewhere / "checkpoints" / "step_00000036" / "custom_checkpoint_0.pkl",
                      weights_only=False)["eval_due"] == -1
    (crashed / "log.jsonl").open("a").write('{"step": 24, "val/mrr": 0.5}\n')  # as if it died just after logging
    launch([*_resume_args(demo), "--output_dir", str(crashed), "--resume_from_checkpoint", "latest"])
    _assert_same_result(crashed, straight)
    # Its log is the uninterrupted run's, but for the times: every dev evaluation once, the simulated row dropped.
    timeless = [[{k: v for k, v in json.loads(line).items() if k != "train/seconds"}
                 for line in (run / "log.jsonl").read_text().splitlines()] for run in (crashed, straight)]
    assert timeless[0] == timeless[1]
    assert [row["step"] for row in timeless[0] if "val/mrr" in row] == [12, 24, 36]


def test_a_run_dying_before_writing_its_best_model_writes_it_when_resumed(demo, straight, tmp_path):
    """The state saying that an evaluation found a better model is saved before best_model/ is written from the
    checkpoint's weights: a crash between the two is made good when resumed, best_model/ being those weights."""
    crashed = tmp_path / "crashed"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", FAILING_EVALUATION, str(ROOT), "-1", *_resume_args(demo),
                             "--output_dir", str(crashed)], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "simulated crash before best_model" in result.stderr, result.stderr[-3000:]
    state = torch.load(crashed / "checkpoints" / "step_00000012" / "custom_checkpoint_0.pkl", weights_only=False)
    assert (state["eval_due"], state["best_due"], state["best_epoch"]) == (-1, True, 0)
    assert not (crashed / "best_model").exists()
    launch([*_resume_args(demo), "--output_dir", str(crashed), "--resume_from_checkpoint", "latest"])
    _assert_same_result(crashed, straight)


def test_lora_run_exports_merged_weights(demo, tmp_path):
    out = tmp_path / "lora"
    launch(["--dataset_dir", demo, "--output_dir", str(out), "--num_epochs", "1", "--max_train_steps", "3",
            "--lora", "true", "--lora_r", "4", "--lora_alpha", "8", *SMALL])
    exported = load_file(out / "model" / "model.safetensors")
    assert not [name for name in exported if "lora" in name or "base_model" in name]
    from modeling_m3el import M3ELModel

    reference = M3ELModel.from_pretrained(out / "model")  # loads strictly: the plain M3EL layout
    assert set(reference.state_dict()) >= set(exported)
    # During training the adapters, not CLIP's own weights, changed: the checkpoint holds LoRA weights.
    checkpoint = _checkpoint_weights(out, 3)
    assert any("lora_A" in name for name in checkpoint) and any("lora_B" in name for name in checkpoint)


def test_activation_checkpointing_trains_to_the_same_weights(demo, tmp_path):
    common = ["--dataset_dir", demo, "--num_epochs", "1", "--max_train_steps", "3", *SMALL]
    launch([*common, "--output_dir", str(tmp_path / "kept")])
    result = launch([*common, "--output_dir", str(tmp_path / "recomputed"), "--activation_checkpointing", "true"])
    assert "activation checkpointing: True" in result.stderr
    kept, recomputed = _checkpoint_weights(tmp_path / "kept", 3), _checkpoint_weights(tmp_path / "recomputed", 3)
    assert kept.keys() == recomputed.keys()
    for name, tensor in kept.items():  # the recomputed forward pass is the same computation: the same bits
        assert torch.equal(recomputed[name], tensor), name
    # The exported model loads without it (a training setting, not part of the model).
    from modeling_m3el import M3ELModel

    assert not M3ELModel.from_pretrained(tmp_path / "recomputed" / "model").is_activation_checkpointing


def test_activation_checkpointing_recomputes_clip_layers_under_lora():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "scripts"))
    try:
        from gathered_negatives import build
        from train_accelerate import TrainingConfig, apply_lora
    finally:
        del sys.path[:2]
    model, batch = build("text_to_image")
    apply_lora(model, TrainingConfig(lora=True, lora_r=4, lora_alpha=8))
    model.train()
    with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it act so that its A matrices get gradients too
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)

    def gradients():
        model.zero_grad(set_to_none=True)
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, kept = gradients()
    model.activation_checkpointing_enable()
    layers = [m for m in model.modules() if type(m).__name__ == "CLIPEncoderLayer"]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    recomputed_loss, recomputed = gradients()
    assert torch.equal(recomputed_loss, loss)
    assert kept.keys() == recomputed.keys() and sum("lora_A" in n for n in kept) == sum("lora_B" in n for n in kept) > 0
    assert all(kept[n].abs().max() > 0 for n in kept if "lora_A" in n)
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-6, atol=0, msg=name)


def launch_refused(args) -> str:
    """Run the script (one process) expecting it to refuse: returns its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0, result.stderr[-3000:]
    return result.stderr


def _train_rows(out: Path) -> list[dict]:
    return [row for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "train/loss" in row]


def test_accumulation_ends_with_the_epoch_and_a_stopped_run_resumes_mid_epoch(demo, tmp_path):
    """12 batches an epoch, 5 accumulated: optimiser steps after batches 5, 10 and 12 (none carried into the next
    epoch). A run stopped by max_train_steps inside an epoch resumes there, to the uninterrupted run's weights; a new
    run over its checkpoints, or a resume with another learning rate or batch, is refused."""
    args = ["--dataset_dir", demo, "--num_epochs", "2", "--eval_every_epochs", "2", "--gradient_accumulation_steps",
            "5", *SMALL]
    straight = tmp_path / "straight"
    launch([*args, "--output_dir", str(straight)])
    rows = _train_rows(straight)
    assert [row["step"] for row in rows] == [3, 6] and [row["train/epoch"] for row in rows] == [0, 1]
    assert all(row["train/mentions_left_out"] == 198 - 16 * 12 for row in rows)  # 198: two nil answers left out
    assert all(isinstance(row["train/unreadable_images"], int) for row in rows)  # (the demo's missing files)

    stopped = tmp_path / "stopped"
    launch([*args, "--output_dir", str(stopped), "--max_train_steps", "2"])  # 10 of epoch 0's 12 batches
    assert "holds the checkpoints of an earlier run (step_00000002)" in launch_refused(
        [*args, "--output_dir", str(stopped)])
    resume = [*args, "--output_dir", str(stopped), "--resume_from_checkpoint", "latest"]
    assert "learning_rate 0.001 -> 0.5" in launch_refused([*resume, "--learning_rate", "0.5"])
    assert "per_device_batch_size 16 -> 8" in launch_refused([*resume, "--per_device_batch_size", "8"])
    launch(resume)
    assert [row["step"] for row in _train_rows(stopped)] == [2, 3, 6]  # epoch 0's first 10 batches, its last 2, epoch 1
    assert not [row for row in map(json.loads, (stopped / "log.jsonl").read_text().splitlines())
                if row["step"] == 2 and any(key.startswith("test/") for key in row)]  # the stopped run's test: dropped
    expected, resumed = _checkpoint_weights(straight, 6), _checkpoint_weights(stopped, 6)
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    # Starting over is possible, on purpose.
    launch([*args, "--output_dir", str(stopped), "--max_train_steps", "1", "--overwrite_output_dir", "true"])
    assert [path.name for path in (stopped / "checkpoints").iterdir()] == ["step_00000001"]


def test_a_batch_the_training_golds_cannot_fill_is_refused(demo, tmp_path):
    from modeling_m3el.data import load_benchmark

    train = load_benchmark(demo).splits["train"]
    golds = len(set(train["answer"]))
    assert golds < 190 <= len(train)  # enough mentions for a batch of 190, not enough different golds
    error = launch_refused(["--dataset_dir", demo, "--output_dir", str(tmp_path / "run"), "--per_device_batch_size",
                            "190", "--num_epochs", "1"])
    assert f"the {len(train)} training mentions have {golds} different gold entities" in error


def test_list_options_and_init_from_on_the_command_line(tmp_path, capsys):
    sys.path.insert(0, str(ROOT))
    try:
        from train_accelerate import parse_args
    finally:
        del sys.path[0]
    assert parse_args(["--lora_target_modules", "q_proj", "v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    assert parse_args(["--lora_target_modules", "q_proj"]).lora_target_modules == ["q_proj"]
    for limit in ("0", "-1"):  # (-1 would delete each checkpoint but the first as soon as it is written)
        with pytest.raises(SystemExit):
            parse_args(["--checkpoints_total_limit", limit])
        assert "--checkpoints_total_limit must be at least 1" in capsys.readouterr().err
    from modeling_m3el import M3ELModel
    from modeling_m3el.demo import demo_processor
    from modeling_m3el.tiny import tiny_config

    config = tiny_config(demo_processor(), matching_dim=24, cross_modal="bidirectional", use_icl=False)
    M3ELModel(config).save_pretrained(tmp_path / "model")
    # The folder's architecture is the run's (and so its training_config.json's), whatever the config file says.
    config = parse_args(["--init_from", str(tmp_path / "model"), "--learning_rate", "2e-5"])
    assert (config.cross_modal, config.use_icl, config.matching_dim) == ("bidirectional", False, 24)
    with pytest.raises(SystemExit):
        parse_args(["--init_from", str(tmp_path / "model"), "--cross_modal", "text_to_image", "--matching_dim", "24"])
    error = capsys.readouterr().err
    assert "conflicts with --cross_modal text_to_image (the folder's model: bidirectional)" in error
    assert "matching_dim" not in error.split("conflicts with")[1]  # the same value is no conflict


def test_the_sampler_counts_the_mentions_it_leaves_out():
    from modeling_m3el.data import UniqueGoldBatchSampler

    answers = ["a"] * 5 + ["b", "c", "d"]  # five mentions of "a" need five batches: at most 3 full pairs
    for seed in range(5):
        sampler = UniqueGoldBatchSampler(answers, 2, seed=seed, drop_last=True)
        batches = list(sampler)
        assert all(len({answers[i] for i in batch}) == 2 for batch in batches)
        assert sampler.left_out == 8 - 2 * len(batches) >= 2
        assert sorted(i for batch in batches for i in batch) == sorted(set(i for batch in batches for i in batch))
        whole = UniqueGoldBatchSampler(answers, 2, seed=seed)
        assert whole.left_out == 0 and sorted(i for batch in whole for i in batch) == list(range(8))


def test_the_collator_counts_the_images_it_cannot_read(demo, tmp_path):
    """Each training batch says how many of its images were unreadable (all-zero instead), so that every epoch's
    total is logged, from whichever process (a DataLoader worker included) read them."""
    import shutil
    import warnings

    sys.path.insert(0, str(ROOT))
    try:
        from train_accelerate import TrainingCollator
    finally:
        del sys.path[0]
    from modeling_m3el.data import load_benchmark
    from modeling_m3el.demo import demo_processor

    data = Path(shutil.copytree(demo, tmp_path / "data"))
    benchmark = load_benchmark(data)
    train = benchmark.splits["train"]
    with_image = [i for i in range(len(train)) if train[i]["image"] and os.path.isfile(train[i]["image"])][:4]
    Path(train[with_image[0]]["image"]).write_bytes(b"not an image")  # one of the four mentions' images is broken
    collator = TrainingCollator(demo_processor(), train, benchmark.entities, benchmark.entity_index, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collator(with_image)
    unreadable = [w for w in caught if "Unreadable image" in str(w.message)]
    assert batch["num_unreadable_images"] == len(unreadable) >= 1
    assert any(train[with_image[0]]["image"] in str(w.message) for w in unreadable)
    assert not batch["has_image"][0] and batch["has_image"][1:].all()


def test_a_new_run_refuses_an_earlier_runs_log_unless_overwriting(tmp_path):
    sys.path.insert(0, str(ROOT))
    try:
        from train_accelerate import TrainingConfig, start_output_dir
    finally:
        del sys.path[0]

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    (tmp_path / "log.jsonl").write_text('{"step": 3, "train/loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"holds the log of an earlier run \(log.jsonl\): start over with "):
        start_output_dir(OneProcess(), TrainingConfig(output_dir=str(tmp_path)))
    start_output_dir(OneProcess(), TrainingConfig(output_dir=str(tmp_path), resume_from_checkpoint="latest"))
    assert (tmp_path / "log.jsonl").exists()  # resuming keeps it
    start_output_dir(OneProcess(), TrainingConfig(output_dir=str(tmp_path), overwrite_output_dir=True))
    assert not (tmp_path / "log.jsonl").exists()
