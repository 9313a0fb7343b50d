"""Hub loading: a saved folder loads with the Auto classes and trust_remote_code in a fresh process that cannot
import this package, offline, and gives the same scores; `from_clip` starts from a local pretrained CLIP."""

import json
import re
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel

from conftest import run_without_package
from modeling_m3el import M3ELModel
from modeling_m3el.tiny import tiny_clip_config, tiny_processor, tiny_config

HUB_FILES = {"configuration_m3el.py", "modeling_m3el.py", "kernels_m3el.py", "processing_m3el.py"}

# Run by `run_without_package` (a fresh offline interpreter where this package cannot be imported): loads the
# folder through the Auto classes and prints the logits as JSON.
FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json

    try:
        import modeling_m3el
    except ImportError:
        pass
    else:
        raise SystemExit("modeling_m3el should not be importable here")

    import torch
    from transformers import AutoConfig, AutoModel, AutoProcessor

    folder, dtype, request = sys.argv[1], getattr(torch, sys.argv[2]), json.loads(sys.argv[3])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    inputs = processor(**request)
    with torch.no_grad():
        output = model(**inputs)
    print(json.dumps({
        "logits": output.logits.float().tolist(),
        "dtype": str(output.logits.dtype),
        "model_dtype": str(model.dtype),
        "cross_modal": config.cross_modal,
        "input_ids": inputs["input_ids"].tolist(),
    }))
    """
)


@pytest.fixture(scope="module", params=["text_to_image", "bidirectional"])
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"m3el_{request.param}")
    torch.manual_seed(0)
    processor = tiny_processor(words=("paris", "hilton"))
    model = M3ELModel(tiny_config(processor, cross_modal=request.param)).eval()
    with torch.no_grad():  # move the LayerNorms away from their identity initialisation
        for name, param in model.named_parameters():
            if "norm" in name and not name.startswith("clip."):
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rng = np.random.default_rng(0)
    image_path = folder.parent / f"{request.param}_photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image_path)
    query = {
        "mentions": ["Paris", "hilton"],
        "sentences": ["Paris at the Hilton", "the hotel"],
        "images": [str(image_path), None],
        "entity_names": ["Paris Hilton", "Hilton", "Paris"],
        "entity_descriptions": ["heiress", "hotel chain", "city"],
        "entity_images": [None, str(image_path), str(image_path)],
    }
    with torch.no_grad():
        logits = model(**processor(**query)).logits
    return folder, query, logits, processor


def run_fresh(folder, dtype: str, query: dict) -> dict:
    result = run_without_package(FRESH_PROCESS_SCRIPT, str(folder), dtype, json.dumps(query), cwd=folder.parent)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_folder_holds_safetensors_and_hub_code(saved):
    folder, *_ = saved
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert HUB_FILES <= files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_m3el.M3ELConfig",
        "AutoModel": "modeling_m3el.M3ELModel",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_m3el.M3ELProcessor"
    # The Hub files import nothing from the rest of the package.
    for name in HUB_FILES:
        source = (folder / name).read_text()
        assert not re.search(r"^\s*(from|import)\s+modeling_m3el", source, flags=re.MULTILINE), name


def test_fresh_process_float32_same_logits(saved):
    folder, query, logits, processor = saved
    result = run_fresh(folder, "float32", query)
    assert result["dtype"] == "torch.float32"
    assert result["input_ids"] == processor(**query)["input_ids"].tolist()
    torch.testing.assert_close(torch.tensor(result["logits"]), logits, rtol=1e-5, atol=1e-5)


def test_fresh_process_bfloat16_close_logits(saved):
    folder, query, logits, _ = saved
    result = run_fresh(folder, "bfloat16", query)
    # a bfloat16 model, whose scores are computed and returned in float32 (from its bfloat16 features)
    assert result["dtype"] == "torch.float32" and result["model_dtype"] == "torch.bfloat16"
    bf16 = torch.tensor(result["logits"])
    torch.testing.assert_close(bf16, logits, rtol=0.05, atol=0.25)
    # The ranking of the entities is the one float32 gives.
    assert torch.equal(bf16.argmax(dim=1), logits.argmax(dim=1))


def test_from_clip_loads_local_pretrained_backbone(tmp_path):
    processor = tiny_processor()
    torch.manual_seed(1)
    clip = CLIPModel(tiny_config(processor).clip_config)
    clip.save_pretrained(tmp_path / "clip")
    model = M3ELModel.from_clip(str(tmp_path / "clip"), matching_dim=8, cross_modal="bidirectional")
    assert model.config.matching_dim == 8 and model.config.cross_modal == "bidirectional"
    assert model.config.clip_config.text_config.vocab_size == len(processor.tokenizer)
    clip_state = clip.state_dict()
    for name, tensor in model.clip.state_dict().items():
        assert torch.equal(tensor, clip_state[name]), name
    assert model.image_embeds_proj.weight.shape == (8, clip.config.projection_dim)
    # The unused CLIP temperature is frozen; everything else trains.
    assert not model.clip.logit_scale.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "clip.logit_scale")


def test_from_clip_rejects_bad_override(tmp_path):
    CLIPModel(tiny_config(tiny_processor()).clip_config).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="M3ELConfig.cross_modal"):
        M3ELModel.from_clip(str(tmp_path / "clip"), cross_modal="image_to_text")


def test_tiny_clip_config_is_bidirectional_capable():
    config = tiny_clip_config(tiny_processor().tokenizer)
    assert config["text_config"]["hidden_size"] == config["projection_dim"]
