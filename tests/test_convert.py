"""Conversion of the authors' Lightning checkpoints (SPEC section 8): every used weight lands where the SPEC says,
the unused modules are dropped and listed, the folder loads with trust_remote_code and scores like the SPEC, and
checkpoints that cannot be converted faithfully are refused.

The checkpoints are built here in the authors' layout, from a name table written in this file (not the converter's),
so a wrong entry in the converter's table shows up as a wrong tensor or a wrong score.
"""

import argparse
import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor, CLIPModel

from modeling_m3el.convert_official_checkpoint import CheckpointConversionError, convert_official_checkpoint, main
from modeling_m3el.tiny import tiny_config, tiny_processor
from spec_reference import reference_outputs

MODES = ("text_to_image", "bidirectional")
NUM_CSRA_HEADS = 5

# The authors' module -> ours (SPEC section 8). "{block}" is the cross-modal block the mode converts.
AUTHORS_TO_OURS = {
    "encoder.clip": "clip",
    "encoder.image_cls_fc": "image_embeds_proj",
    "encoder.image_tokens_fc": "image_tokens_proj",
    "matcher.text_cls_layernorm": "text_embeds_norm",
    "matcher.text_tokens_layernorm": "text_tokens_norm",
    "matcher.image_cls_layernorm": "image_embeds_norm",
    "matcher.image_tokens_layernorm": "image_tokens_norm",
    "matcher.timm.fc_query": "text_matching.query",
    "matcher.timm.fc_key": "text_matching.key",
    "matcher.timm.fc_value": "text_matching.value",
    "matcher.timm.fc_cls": "text_matching.global_proj",
    "matcher.timm.layer_norm": "text_matching.context_norm",
    "matcher.iimm.fc_query": "image_matching.query",
    "matcher.iimm.fc_key": "image_matching.key",
    "matcher.iimm.fc_value": "image_matching.value",
    "matcher.iimm.fc_cls": "image_matching.global_proj",
    "matcher.iimm.layer_norm": "image_matching.context_norm",
    "matcher.{block}.text_fc": "cross_modal_matching.text_proj",
    "matcher.{block}.image_fc": "cross_modal_matching.image_proj",
    "matcher.{block}.gate_fc": "cross_modal_matching.gate",
    "matcher.{block}.gate_layer_norm": "cross_modal_matching.gate_norm",
    "matcher.{block}.match_module.trans_linear": "cross_modal_matching.match.proj",
    "matcher.{block}.fusion_module.linear": "cross_modal_matching.fusion",
}
BLOCK = {"text_to_image": "cmm", "bidirectional": "cmmb"}
POSITION_IDS = ("encoder.clip.text_model.embeddings.position_ids", "encoder.clip.vision_model.embeddings.position_ids")


def unused_modules(mode: str) -> set[str]:
    """The authors' modules a conversion in `mode` must drop (one entry per module)."""
    other = BLOCK["bidirectional" if mode == "text_to_image" else "text_to_image"]
    used_mclet = {"cmm": ["mclet_text_loss"], "cmmb": ["mclet_text_loss", "mclet_image_loss"]}[BLOCK[mode]]
    return {
        f"matcher.{other}",
        *(f"matcher.{BLOCK[mode]}.{name}" for name in used_mclet),
        "matcher.mclet_text_loss",
        "matcher.mclet_image_loss",
        "matcher.text_fc",
        "matcher.image_fc",
        "matcher.scale_text_cls_layernorm",
        "matcher.scale_text_tokens_layernorm",
        "matcher.scale_image_cls_layernorm",
        "matcher.scale_image_tokens_layernorm",
        "matcher.weight_cl_loss.logit_scale",
    }


def authors_state_dict(config, seed: int = 0) -> dict[str, torch.Tensor]:
    """A `LightningForM3EL` state dict in the authors' names and shapes, random values, both cross-modal blocks."""
    generator = torch.Generator().manual_seed(seed)
    clip_config = config.clip_config
    d, p = config.matching_dim, clip_config.projection_dim
    ht, hv = clip_config.text_config.hidden_size, clip_config.vision_config.hidden_size

    def randn(*shape):
        return torch.randn(shape, generator=generator)

    state = {}

    def linear(name, n_out, n_in):
        state[f"{name}.weight"] = randn(n_out, n_in) / math.sqrt(n_in)
        state[f"{name}.bias"] = 0.1 * randn(n_out)

    def layer_norm(name, n):  # away from the identity, so that swapped LayerNorms change the scores
        state[f"{name}.weight"] = 1 + 0.3 * randn(n)
        state[f"{name}.bias"] = 0.3 * randn(n)

    def mclet(name):  # MCLETLoss.cl_fc = Sequential(Linear, ELU, Linear)
        linear(f"{name}.cl_fc.0", d, d)
        linear(f"{name}.cl_fc.2", d, d)

    torch.manual_seed(seed)
    for key, value in CLIPModel(clip_config).state_dict().items():
        state[f"encoder.clip.{key}"] = value + 0.02 * randn(*value.shape) if value.is_floating_point() else value
    # Old transformers versions saved these buffers; the checkpoints of the authors' time hold them.
    text_positions = clip_config.text_config.max_position_embeddings
    vision_positions = (clip_config.vision_config.image_size // clip_config.vision_config.patch_size) ** 2 + 1
    state[POSITION_IDS[0]] = torch.arange(text_positions).unsqueeze(0)
    state[POSITION_IDS[1]] = torch.arange(vision_positions).unsqueeze(0)

    linear("encoder.image_cls_fc", d, p)
    linear("encoder.image_tokens_fc", d, hv)
    layer_norm("matcher.text_cls_layernorm", p)
    layer_norm("matcher.text_tokens_layernorm", ht)
    layer_norm("matcher.image_cls_layernorm", d)
    layer_norm("matcher.image_tokens_layernorm", d)
    for block, token_dim, cls_dim in (("timm", ht, p), ("iimm", d, d)):
        for name in ("fc_query", "fc_key", "fc_value"):
            linear(f"matcher.{block}.{name}", d, token_dim)
        linear(f"matcher.{block}.fc_cls", d, cls_dim)
        layer_norm(f"matcher.{block}.layer_norm", d)
    for block in ("cmm", "cmmb"):
        linear(f"matcher.{block}.text_fc", d, p)
        linear(f"matcher.{block}.image_fc", d, d)
        linear(f"matcher.{block}.gate_fc", 1, d)
        layer_norm(f"matcher.{block}.gate_layer_norm", d)
        linear(f"matcher.{block}.match_module.trans_linear", d, d)
        state[f"matcher.{block}.multi_head_module.weight"] = torch.ones(NUM_CSRA_HEADS, 1)
        mclet(f"matcher.{block}.mclet_text_loss")
    linear("matcher.cmm.fusion_module.linear", d, d)
    mclet("matcher.cmmb.mclet_image_loss")
    # Built by the authors' matcher, never used.
    linear("matcher.text_fc", d, p)
    linear("matcher.image_fc", d, d)
    for name in ("text_cls", "text_tokens", "image_cls", "image_tokens"):
        layer_norm(f"matcher.scale_{name}_layernorm", d)
    mclet("matcher.mclet_text_loss")
    mclet("matcher.mclet_image_loss")
    state["matcher.weight_cl_loss.logit_scale"] = torch.ones([])
    return state


def our_params(state: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    """The authors' used tensors under our names, through this file's table."""
    table = {theirs.format(block=BLOCK[mode]): ours for theirs, ours in AUTHORS_TO_OURS.items()}
    if mode == "bidirectional":
        del table["matcher.cmmb.fusion_module.linear"]
    params = {}
    for key, value in state.items():
        if key in POSITION_IDS:
            continue
        module = max((theirs for theirs in table if key.startswith(theirs + ".")), key=len, default=None)
        if module is not None:
            params[table[module] + key[len(module) :]] = value
    return params


def save_checkpoint(path, state, **extra):
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, **extra}, path)
    return str(path)


def run_main(argv: list[str]) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    return code, stdout.getvalue(), stderr.getvalue()


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(words=("paris", "hilton", "tower"))


@pytest.fixture(scope="module")
def clip_folder(processor, tmp_path_factory):
    """What `--clip` points to: a CLIP config with its tokenizer and image processor (no weights)."""
    folder = tmp_path_factory.mktemp("clip")
    tiny_config(processor).clip_config.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def checkpoint_state(processor):
    return authors_state_dict(tiny_config(processor), seed=0)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_state, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "epoch=3-step=100.ckpt", checkpoint_state)


@pytest.fixture(scope="module", params=MODES)
def converted(request, checkpoint, clip_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp(f"converted_{request.param}") / "m3el"
    code, stdout, stderr = run_main(
        ["--checkpoint", checkpoint, "--clip", clip_folder, "--cross-modal", request.param, "--output", str(output)]
    )
    assert code == 0, stderr
    return request.param, output, stdout


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for index, size in enumerate([(40, 50), (32, 32), (60, 30), (45, 45)]):
        path = folder / f"image_{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------------------------------------- the happy path


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "modeling_m3el.convert_official_checkpoint", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for option in ("--checkpoint", "--clip", "--cross-modal", "--output", "--overwrite", "--unsafe-load"):
        assert option in result.stdout


def test_every_used_weight_is_mapped_exactly(converted, checkpoint_state):
    mode, output, _ = converted
    saved = load_file(output / "model.safetensors")
    expected = our_params(checkpoint_state, mode)
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(saved[key], tensor), key


def test_printed_report(converted):
    mode, _, stdout = converted
    for module in unused_modules(mode):
        assert module in stdout
    assert f"matcher.{BLOCK[mode]}.multi_head_module.weight == 1" in stdout
    for key in POSITION_IDS:
        assert f"{key}: equals the arange CLIP builds" in stdout
    assert "processor written: yes" in stdout


@pytest.mark.parametrize("mode", MODES)
def test_report_accounts_for_every_key(mode, checkpoint, clip_folder, checkpoint_state, tmp_path):
    report = convert_official_checkpoint(checkpoint, clip_folder, mode, tmp_path / "out")
    assert report.num_mapped == len(our_params(checkpoint_state, mode))
    assert set(report.dropped) == unused_modules(mode)
    # Every key of the checkpoint is mapped, checked (CSRA head weights, position_ids) or dropped.
    assert len(report.checked) == 1 + len(POSITION_IDS)
    assert report.num_mapped + len(report.checked) + sum(report.dropped.values()) == len(checkpoint_state)
    assert report.matching_dim == 16 and report.processor_written


def test_checkpoint_without_position_ids(checkpoint_state, clip_folder, tmp_path):
    # Checkpoints saved by newer transformers versions hold no position_ids buffers; that is fine too.
    state = {key: value for key, value in checkpoint_state.items() if key not in POSITION_IDS}
    path = save_checkpoint(tmp_path / "no_buffers.ckpt", state)
    report = convert_official_checkpoint(path, clip_folder, "bidirectional", tmp_path / "out")
    assert report.checked == ["matcher.cmmb.multi_head_module.weight == 1 (5 CSRA heads)"]
    assert report.num_mapped == len(our_params(checkpoint_state, "bidirectional"))


def test_folder_is_hub_ready(converted):
    mode, output, _ = converted
    files = {path.name for path in output.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_m3el.py", "modeling_m3el.py"} <= files
    assert {"processing_m3el.py", "processor_config.json", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_m3el.M3ELModel"
    assert config["cross_modal"] == mode and config["matching_dim"] == 16
    assert config["text_max_length"] == 40
    assert config["csra_temperatures"] == [2.0, 2.5, 3.5, 4.5, 99.0]
    # Written through a temporary sibling that is renamed into place: nothing else is left next to it.
    assert [path.name for path in output.parent.iterdir()] == ["m3el"]


def test_converted_scores_match_the_spec(converted, checkpoint_state, processor, images):
    mode, output, _ = converted
    model = AutoModel.from_pretrained(output, trust_remote_code=True).to(torch.float64).eval()
    assert type(model).__name__ == "M3ELModel"  # the fresh-process loading is test_hub_loading's subject
    hub_processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    request = dict(
        mentions=["Paris", "Hilton%20hotel", "tower"],
        sentences=["Paris Hilton at the tower", "a hotel in paris", "the tower at night"],
        images=[images[0], None, images[1]],
        entity_names=["Paris Hilton", "Paris", "Eiffel Tower", "Hilton"],
        entity_descriptions=["an heiress", "capital of France", "a tower in paris", "a hotel chain"],
        entity_images=[images[2], images[3], None, images[0]],
    )
    inputs = processor(**request)
    hub_inputs = hub_processor(**request)
    # The processor written next to the weights prepares the same inputs as the one the checkpoint was paired with.
    for key in ("input_ids", "entity_input_ids", "pixel_values", "entity_pixel_values"):
        torch.testing.assert_close(hub_inputs[key], inputs[key], msg=key)
    for key in ("pixel_values", "entity_pixel_values"):
        inputs[key] = inputs[key].to(torch.float64)
    with torch.no_grad():
        scores = model(**inputs)
    mention = {key: inputs[key] for key in ("input_ids", "attention_mask", "pixel_values")}
    entity = {key: inputs[f"entity_{key}"] for key in ("input_ids", "attention_mask", "pixel_values")}
    expected = reference_outputs(
        our_params(checkpoint_state, mode), tiny_config(processor, cross_modal=mode), mention, entity
    )
    names = ["logits", "text_logits", "image_logits", "text_to_image_logits"]
    names += ["image_to_text_logits"] if mode == "bidirectional" else []
    assert (scores.image_to_text_logits is not None) == (mode == "bidirectional")
    for name in names:
        torch.testing.assert_close(scores[name], expected[name], rtol=1e-9, atol=1e-10, msg=name)


# ------------------------------------------------------------------------------------------------- refusals


def test_missing_weight_is_refused(checkpoint_state, clip_folder, tmp_path):
    state = dict(checkpoint_state)
    del state["matcher.timm.fc_key.bias"]
    path = save_checkpoint(tmp_path / "missing.ckpt", state)
    with pytest.raises(CheckpointConversionError, match=r"missing.ckpt.*matcher\.timm\.fc_key\.bias"):
        convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_misshapen_weight_is_refused(checkpoint_state, clip_folder, tmp_path):
    state = dict(checkpoint_state)
    state["encoder.image_tokens_fc.weight"] = torch.zeros(16, 49)
    path = save_checkpoint(tmp_path / "misshapen.ckpt", state)
    with pytest.raises(CheckpointConversionError) as error:
        convert_official_checkpoint(path, clip_folder, "bidirectional", tmp_path / "out")
    message = str(error.value)
    assert "misshapen.ckpt" in message and "encoder.image_tokens_fc.weight" in message
    assert "(16, 48)" in message and "(16, 49)" in message


@pytest.mark.parametrize("mode", MODES)
def test_csra_head_weights_other_than_one_are_refused(mode, checkpoint_state, clip_folder, tmp_path):
    state = dict(checkpoint_state)
    key = f"matcher.{BLOCK[mode]}.multi_head_module.weight"
    state[key] = torch.tensor([[1.0], [1.0], [0.5], [1.0], [1.0]])
    path = save_checkpoint(tmp_path / "heads.ckpt", state)
    with pytest.raises(CheckpointConversionError, match=rf"heads\.ckpt.*{re.escape(key)}"):
        convert_official_checkpoint(path, clip_folder, mode, tmp_path / "out")


def test_unknown_key_is_refused_and_listed(checkpoint_state, clip_folder, tmp_path):
    state = dict(checkpoint_state)
    state["matcher.extra_head.weight"] = torch.zeros(2, 2)
    state["encoder.clip.text_model.adapter.bias"] = torch.zeros(2)
    path = save_checkpoint(tmp_path / "unknown.ckpt", state)
    with pytest.raises(CheckpointConversionError) as error:
        convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "out")
    message = str(error.value)
    assert "unknown.ckpt" in message
    assert "matcher.extra_head.weight" in message and "encoder.clip.text_model.adapter.bias" in message


def test_existing_output_is_kept_unless_overwrite(checkpoint, clip_folder, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    argv = ["--checkpoint", checkpoint, "--clip", clip_folder, "--cross-modal", "text_to_image"]
    argv += ["--output", str(output)]
    code, _, stderr = run_main(argv)
    assert code == 1 and "--overwrite" in stderr
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    code, _, stderr = run_main(argv + ["--overwrite"])
    assert code == 0, stderr
    assert not (output / "keep.txt").exists() and (output / "model.safetensors").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_output_holding_the_inputs_is_refused(checkpoint_state, clip_folder, tmp_path):
    path = save_checkpoint(tmp_path / "inside.ckpt", checkpoint_state)
    with pytest.raises(FileExistsError, match="inside.ckpt"):
        convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path, overwrite=True)
    assert (tmp_path / "inside.ckpt").exists()


def test_unknown_cross_modal_mode_is_a_usage_error(checkpoint, clip_folder, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        with contextlib.redirect_stderr(io.StringIO()):
            main(["--checkpoint", checkpoint, "--clip", clip_folder, "--cross-modal", "both", "--output", "out"])
    assert exit_.value.code == 2


def test_a_crash_while_writing_leaves_nothing(checkpoint, clip_folder, tmp_path, monkeypatch):
    from modeling_m3el.processing_m3el import M3ELProcessor

    def crash(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(M3ELProcessor, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_official_checkpoint(checkpoint, clip_folder, "text_to_image", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------- hyper-parameters


def test_pickled_hyper_parameters_need_unsafe_load(checkpoint_state, clip_folder, tmp_path):
    # The authors' Lightning module saves its OmegaConf arguments; any non-container object is refused the same way.
    hyper_parameters = argparse.Namespace(data={"text_max_length": 40, "kb_img_folder": "/data/WikiMEL/kb_image"})
    path = save_checkpoint(tmp_path / "pickled.ckpt", checkpoint_state, hyper_parameters=hyper_parameters)
    with pytest.raises(CheckpointConversionError, match=r"pickled\.ckpt.*argparse\.Namespace.*--unsafe-load"):
        convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "out")
    report = convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "out", unsafe_load=True)
    assert report.num_mapped > 0


def test_hyper_parameters_cross_check(checkpoint_state, clip_folder, tmp_path):
    longer = {"data": {"text_max_length": 64, "kb_img_folder": "/data/WikiMEL/kb_image"}, "model": {"weight": 1.0}}
    path = save_checkpoint(tmp_path / "longer.ckpt", checkpoint_state, hyper_parameters=longer)
    with pytest.raises(CheckpointConversionError, match=r"longer\.ckpt.*text_max_length=64.*--text-max-length 64"):
        convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "out")

    wikidiverse = {"data": {"text_max_length": 40, "kb_img_folder": "/data/WikiDiverse/kb_image"}}
    path = save_checkpoint(tmp_path / "wikidiverse.ckpt", checkpoint_state, hyper_parameters=wikidiverse)
    report = convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "t2v")
    assert any("matcher.cmmb" in note and "untrained" in note for note in report.notes)
    report = convert_official_checkpoint(path, clip_folder, "bidirectional", tmp_path / "bi")
    assert not any("untrained" in note for note in report.notes)


@pytest.mark.parametrize("with_image_processor", [False, True])
def test_clip_without_tokenizer_writes_no_processor(with_image_processor, checkpoint, processor, tmp_path):
    clip_only = tmp_path / "clip_without_tokenizer"
    tiny_config(processor).clip_config.save_pretrained(clip_only)
    if with_image_processor:  # transformers then builds an empty tokenizer instead of failing: caught by its size
        processor.image_processor.save_pretrained(clip_only)
    report = convert_official_checkpoint(checkpoint, clip_only, "text_to_image", tmp_path / "out")
    assert not report.processor_written
    assert any(note.startswith("no processor written") for note in report.notes)
    files = {path.name for path in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in files and "processor_config.json" not in files


def test_m3el_convert_passes_every_option_on(checkpoint, clip_folder, tmp_path, capsys):
    from modeling_m3el.cli import main as m3el

    assert m3el(["convert", "--checkpoint", checkpoint, "--clip", clip_folder, "--cross-modal", "text_to_image",
                 "--output", str(tmp_path / "out")]) == 0
    assert "Converted" in capsys.readouterr().out and (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exit_info:
        m3el(["convert", "--help"])
    assert exit_info.value.code == 0 and "--cross-modal" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_a_damaged_or_foreign_file_is_said_so(damage, checkpoint, clip_folder, tmp_path):
    data = Path(checkpoint).read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "text": b"not a checkpoint at all\n"}[damage])
    with pytest.raises(CheckpointConversionError, match=r"bad\.ckpt: cannot be read as a PyTorch checkpoint") as error:
        convert_official_checkpoint(bad, clip_folder, "text_to_image", tmp_path / "out")
    assert "--unsafe-load" not in str(error.value)


def test_a_block_left_at_its_initial_values_is_noted(checkpoint_state, clip_folder, tmp_path):
    """Weights only (no hyper-parameters saying the mode): converting the block a run never trained is noted, and the
    report names the other mode's block for what it is."""
    state = dict(checkpoint_state)
    for name in ("weight", "bias"):
        key = f"matcher.cmm.gate_layer_norm.{name}"
        state[key] = torch.ones_like(state[key]) if name == "weight" else torch.zeros_like(state[key])
    path = save_checkpoint(tmp_path / "bidirectional.ckpt", state)
    report = convert_official_checkpoint(path, clip_folder, "text_to_image", tmp_path / "t2v")
    assert any("looks trained in bidirectional mode" in note and "--cross-modal bidirectional" in note
               for note in report.notes)
    report = convert_official_checkpoint(path, clip_folder, "bidirectional", tmp_path / "bi")
    assert not any("looks trained" in note for note in report.notes)
    assert "matcher.cmm: 17 (the text_to_image mode's cross-modal block)" in str(report)
