"""The folder a trained M3EL is published as, built from a training run, and its push to the Hub.

    folder = build_hub_folder("m3el-demo", "m3el-demo-hub", repo_id="me/m3el-demo")   # a run's output -> the folder
    push_to_hub(folder, "me/m3el-demo", private=True, dry_run=True)                    # the files it would upload
    push_to_hub(folder, "me/m3el-demo", private=True)                                  # create the repo, upload

The folder: `config.json` (with `auto_map` and the pipeline's `custom_pipelines` entry), `model.safetensors`, the
processor's files, the Hub code (configuration, modeling, processing, index and pipeline files), the entity index
(`entity_index.safetensors`, `entity_index.json`) with the KB's metadata (`entities.jsonl`, and thumbnails of the
entity images in `entity_images/`), a few example mentions (`examples.jsonl`, `examples/`), the run's
`test_results.json`, `training_config.json` and `log.jsonl`, the Inference Endpoints `handler.py`, and the model card
(`README.md`, `plots/`).
"""

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from PIL import Image

HANDLER_PATH = Path(__file__).resolve().parents[1] / "hub_card" / "handler.py"
# Never uploaded: leftovers of interrupted writes and Python caches (upload_folder adds .git and .cache itself).
HUB_IGNORE_PATTERNS = ["*.tmp", "*/*.tmp", ".entity_index.*", "*__pycache__*", "*.pyc"]
# A folder without these is not a built one (push refuses it).
REQUIRED_FILES = ("config.json", "model.safetensors", "processor_config.json", "pipeline_m3el.py", "index_m3el.py",
                  "entity_index.json", "entity_index.safetensors", "README.md")
RUN_FILES = ("test_results.json", "training_config.json")
ENTITY_IMAGE_MODES = ("thumbnail", "none")
THUMBNAIL_SIZE = 160  # pixels, the longer side: the Space shows them small; 160 entities of the demo take ~0.5 MB
ENTITY_IMAGE_FOLDER = "entity_images"
EXAMPLE_FOLDER = "examples"


def _model_dir(run_dir: str) -> str:
    """A run's output folder holds the model in `model/`; a model folder may be given directly."""
    nested = os.path.join(run_dir, "model")
    return nested if os.path.isfile(os.path.join(nested, "config.json")) else run_dir


def _thumbnail(source: str, destination: str) -> bool:
    """Save a small RGB JPEG of `source`; False when it cannot be read (the entity then shows no image)."""
    try:
        with Image.open(source) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
            image.save(destination, format="JPEG", quality=90)
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def build_hub_folder(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    dataset_id: str | None = None,
    entity_images: str = "thumbnail",
    num_examples: int = 3,
    device: str | None = None,
    entity_batch_size: int = 256,
    overwrite: bool = False,
    num_workers: int = 0,
) -> str:
    """
    Build the publishable folder of a training run (see the module docstring) and return its path.

    Args:
        run_dir: `train_accelerate.py`'s output folder (or its `model/` folder).
        output_dir: where to build; must not exist or be empty, unless `overwrite`.
        data_dir: the benchmark whose KB is indexed (default: the run's `dataset_dir`, or its `demo_dir`).
        repo_id: the Hub repo the folder is meant for; the card's usage snippets load it (default: `output_dir`).
        dataset_id: the benchmark's Hub dataset id, if it has one, for the card's metadata.
        entity_images: `"thumbnail"`: small JPEG copies of each entity's first image, so that results and the
            Space can show them; `"none"`: no images (the KB's own paths are local to the training machine).
        num_examples: example mentions from the test split (with images) shipped for the card and the Space.
        num_workers: threads reading the KB's images ahead of the model (`EntityIndex.build`).
    """
    from . import M3ELModel, M3ELProcessor
    from .data import MissingSplitError, load_benchmark
    from .evaluation import index_rows
    from .index_m3el import EntityIndex
    from .model_card import EXAMPLES_FILE, write_model_card
    from .pipeline_m3el import M3ELEntityLinkingPipeline

    if entity_images not in ENTITY_IMAGE_MODES:
        raise ValueError(f"entity_images must be one of {ENTITY_IMAGE_MODES}, got {entity_images!r}")
    run_dir, output_dir = os.path.abspath(run_dir), os.path.abspath(output_dir)
    model_dir = _model_dir(run_dir)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"{run_dir} holds no trained model (no config.json in it or in its model/ folder)")
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} is not empty; give a new folder or overwrite=True")
    training_config = {}
    if os.path.isfile(os.path.join(model_dir, "training_config.json")):
        with open(os.path.join(model_dir, "training_config.json"), encoding="utf-8") as f:
            training_config = json.load(f)
    data_dir = data_dir or training_config.get("dataset_dir") or training_config.get("demo_dir")
    if not data_dir or not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"the KB to index is not found (data folder {data_dir!r} from the run's training_config.json); "
            "give data_dir (--data)"
        )

    # 1. The model, and the KB's entities with the test mentions the examples come from.
    model = M3ELModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = M3ELProcessor.from_pretrained(model_dir)
    # The KB, and the test split the examples come from: a folder without one gets no examples (a broken one is an
    # error, not skipped).
    try:
        benchmark = load_benchmark(data_dir, splits=["test"])
    except MissingSplitError:
        benchmark = load_benchmark(data_dir, splits=[])
    dataset_name = benchmark.name  # (the built-in demo's folder loads as DEMO_DATASET)

    temporary = output_dir.rstrip("/") + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)

    # 2. The KB's metadata, with thumbnails of the entity images under the folder.
    rows = index_rows(benchmark.entities)
    metadata = []
    if entity_images == "thumbnail":
        os.makedirs(os.path.join(temporary, ENTITY_IMAGE_FOLDER))
    for number, row in enumerate(rows):
        images = []
        if entity_images == "thumbnail" and row["image"]:
            relative = f"{ENTITY_IMAGE_FOLDER}/{number:06d}.jpg"
            if _thumbnail(row["image"], os.path.join(temporary, relative)):
                images.append(relative)
        metadata.append({"id": row["id"], "name": row["name"], "description": row["description"], "images": images})

    # 3. The index, and the pipeline that saves model, processor, code, index and metadata together.
    index = EntityIndex.build(model.to(device or "cpu"), processor, rows, batch_size=entity_batch_size,
                              num_workers=num_workers)
    linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=index, entities=metadata,
                                       device=device or "cpu")
    linker.save_pretrained(temporary)

    # 4. The run's results and recipe, the Endpoints handler, example mentions.
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(model_dir, name)):
            shutil.copyfile(os.path.join(model_dir, name), os.path.join(temporary, name))
    _shorten_local_paths(os.path.join(temporary, "training_config.json"))
    log_path = next((p for p in (os.path.join(run_dir, "log.jsonl"), os.path.join(model_dir, "log.jsonl"))
                     if os.path.isfile(p)), None)
    if log_path:
        shutil.copyfile(log_path, os.path.join(temporary, "log.jsonl"))
    if HANDLER_PATH.is_file():
        shutil.copyfile(HANDLER_PATH, os.path.join(temporary, "handler.py"))
    else:  # hub_card/ lives next to the package in a source checkout, not in an installed wheel
        warnings.warn(f"{HANDLER_PATH} not found: the folder gets no Inference Endpoints handler.py")
    examples = []
    test = benchmark.splits.get("test")
    for row in (test if test is not None else []):
        if len(examples) >= num_examples:
            break
        if row["image"]:
            os.makedirs(os.path.join(temporary, EXAMPLE_FOLDER), exist_ok=True)
            relative = f"{EXAMPLE_FOLDER}/{len(examples)}{os.path.splitext(row['image'])[1] or '.jpg'}"
            shutil.copyfile(row["image"], os.path.join(temporary, relative))
            examples.append({"mention": row["mention"], "text": row["sentence"], "image": relative,
                             "answer": row["answer"]})
    if examples:
        with open(os.path.join(temporary, EXAMPLES_FILE), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(example, ensure_ascii=False) + "\n" for example in examples)

    # 5. The card, written for the folder's final place (or the repo), then the folder moved there.
    write_model_card(temporary, log_path=log_path, model_id=repo_id or output_dir, dataset_name=dataset_name,
                     dataset_id=dataset_id)
    if os.path.exists(output_dir):
        shutil.rmtree(output_dir)
    os.replace(temporary, output_dir)
    return output_dir


PATH_FIELDS = ("dataset_dir", "demo_dir", "output_dir", "clip", "init_from")  # training_config.json's paths


def _shorten_local_paths(path: str) -> None:
    """The training machine's absolute paths in a published training_config.json (and so in the card) become their
    last component: `/home/me/data/WikiMEL` -> `WikiMEL`. Hub ids and relative paths stay."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    changed = False
    for key in PATH_FIELDS:
        value = config.get(key)
        if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
            config[key] = os.path.basename(os.path.normpath(os.path.expanduser(value))) or value
            changed = True
    if changed:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)


def _card_model_ids(folder: str) -> set[str]:
    """The model ids the folder's card loads in its snippets."""
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        return set()
    with open(card, encoding="utf-8") as f:
        return set(re.findall(r'(?:from_pretrained\(|model=)"([^"]+)"', f.read()))


def hub_files(folder: str | os.PathLike) -> list[str]:
    """The files `push_to_hub` uploads from `folder` (paths in the repo, sorted), filtered as `upload_folder` does."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    folder = Path(folder).resolve()
    paths = [path.relative_to(folder).as_posix() for path in sorted(folder.glob("**/*")) if path.is_file()]
    return sorted(filter_repo_objects(paths, ignore_patterns=HUB_IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS))


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    dry_run: bool = False,
):
    """
    Create the model repo `repo_id` (private or public; an existing repo keeps its visibility) and upload a folder
    built by `build_hub_folder` in one commit. With `dry_run`, touch nothing and return the list of files that would
    be uploaded; otherwise return the commit's `CommitInfo`.
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no folder {folder}")
    files = hub_files(folder)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ValueError(f"{folder} is not a built M3EL folder (missing {', '.join(missing)}); build it with "
                         "build_hub_folder (m3el export) first")
    other = sorted(_card_model_ids(folder) - {repo_id})
    if other:
        raise ValueError(f"the model card in {folder} was written for {', '.join(other)} (its snippets load that), "
                         f"not for {repo_id}: build the folder again with m3el export --repo-id {repo_id}")
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message=commit_message or f"Upload M3EL linker ({len(files)} files)",
        ignore_patterns=list(HUB_IGNORE_PATTERNS),
    )


__all__ = ["HUB_IGNORE_PATTERNS", "REQUIRED_FILES", "build_hub_folder", "hub_files", "push_to_hub"]
