"""The model card of a trained M3EL: Hub metadata with a model-index of the test results, usage that runs as written,
the recipe, limitations, the citation, and plots of Hits@k and of the training curves.

    card = model_card("run/model", log_path="run/log.jsonl", model_id="user/m3el-wikimel")   # a ModelCard
    write_model_card("run/model", log_path="run/log.jsonl")                                  # README.md + plots/
"""

import json
import os
import re
import shlex
import textwrap

from huggingface_hub import EvalResult, ModelCard, ModelCardData

PAPER_URL = "https://arxiv.org/abs/2412.10440"
TASK = "multimodal-entity-linking"  # the custom pipeline's task (pipeline_m3el.TASK)
# The Hub's pipeline_tag must be one of its own tasks, and none of them is entity linking: "other" is the honest one
# (the Hub's task list has it). Left out, the Hub would guess one from the architecture (AutoModel: feature
# extraction), which is not what this model does.
PIPELINE_TAG = "other"
TAGS = [TASK, "entity-linking", "multimodal", "m3el", "clip", "custom_code"]
PLOTS_FOLDER = "plots"
HITS_PLOT = f"{PLOTS_FOLDER}/hits_at_k.png"
CURVES_PLOT = f"{PLOTS_FOLDER}/training_curves.png"
EXAMPLES_FILE = "examples.jsonl"  # example mentions shipped with a published model (publish.py writes it)
# The built-in demo benchmark's name, and the file `modeling_m3el.demo` writes beside it (its folder loads under that
# name). Here, in a module with no heavy imports, for the loaders and the card alike.
DEMO_DATASET = "m3el-demo"
DEMO_MANIFEST = "demo_manifest.json"

CITATION = """\
@inproceedings{hu2025m3el,
  title         = {Multi-level Matching Network for Multimodal Entity Linking},
  author        = {Hu, Zhiwei and Guti{\\'e}rrez-Basulto, V{\\'i}ctor and Li, Ru and Pan, Jeff Z.},
  booktitle     = {Proceedings of the 31st ACM SIGKDD Conference on Knowledge Discovery and Data Mining (KDD 2025)},
  year          = {2025},
  eprint        = {2412.10440},
  archivePrefix = {arXiv},
}"""

# Metric key in test_results.json -> (model-index metric type, display name); MR is lower-is-better.
METRICS = {"mrr": ("mrr", "MRR"), "mr": ("mean_rank", "MR")}
# Training-config fields shown in the hyperparameter table, in this order.
HYPERPARAMETERS = (
    "clip", "init_from", "cross_modal", "matching_dim", "use_text_matching", "use_image_matching",
    "use_cross_modal_matching", "use_icl", "lora", "lora_r", "lora_alpha", "seed", "num_epochs",
    "per_device_batch_size", "gradient_accumulation_steps", "learning_rate", "adam_beta1", "adam_beta2",
    "adam_epsilon", "weight_decay", "eval_every_epochs", "early_stopping_patience",
)


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _read_jsonl(path) -> list[dict]:
    if not path or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hits_at(results: dict) -> list[tuple[int, float]]:
    """[(k, Hits@k)] sorted by k, from `hits@k` keys."""
    found = [(int(key.split("@", 1)[1]), value) for key, value in results.items() if re.fullmatch(r"hits@\d+", key)]
    return sorted(found)


def _is_hub_id(name) -> bool:
    """A Hub repo id (`org/name` or a bare canonical name), not a local path."""
    return isinstance(name, str) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def dataset_name_of(training_config: dict) -> str:
    """The benchmark's name as far as the run's config tells it (the built-in demo when it had no dataset_dir)."""
    folder = training_config.get("dataset_dir")
    if folder is None:
        return DEMO_DATASET
    if os.path.isfile(os.path.join(folder, DEMO_MANIFEST)):
        return DEMO_DATASET
    return os.path.basename(os.path.normpath(folder))


def eval_results(results: dict, dataset_name: str, dataset_id: str | None = None) -> list[EvalResult]:
    """The model-index entries of a run's test results (MRR, MR, Hits@k), one per metric."""
    common = dict(
        task_type=PIPELINE_TAG, task_name="Multimodal Entity Linking", dataset_type=dataset_id or dataset_name,
        dataset_name=dataset_name, dataset_split="test",
    )
    entries = [
        EvalResult(metric_type=metric_type, metric_name=name, metric_value=float(results[key]), **common)
        for key, (metric_type, name) in METRICS.items() if key in results
    ]
    entries += [
        EvalResult(metric_type=f"hits_at_{k}", metric_name=f"Hits@{k}", metric_value=float(value), **common)
        for k, value in _hits_at(results)
    ]
    return entries


def card_data(results: dict, training_config: dict, model_name: str, dataset_name: str,
              dataset_id: str | None = None) -> ModelCardData:
    base = training_config.get("init_from") or training_config.get("clip")
    return ModelCardData(
        model_name=model_name,
        base_model=base if _is_hub_id(base) else None,
        datasets=[dataset_id] if dataset_id else None,
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=PIPELINE_TAG,
        tags=list(TAGS),
        metrics=["mrr", "mean_rank", "hits_at_k"],
        eval_results=eval_results(results, dataset_name, dataset_id) if results else None,
    )


# ---------------------------------------------------------------------------------------------------- plots


def plot_hits_at_k(results: dict, path: str, title: str) -> str:
    """A bar chart of Hits@k, saved as PNG at `path`."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    hits = _hits_at(results)
    figure = Figure(figsize=(5, 3.2), dpi=120, layout="constrained")
    axes = figure.subplots()
    bars = axes.bar([f"Hits@{k}" for k, _ in hits], [value for _, value in hits], color="#4c72b0")
    axes.bar_label(bars, labels=[f"{value:.3f}" for _, value in hits], padding=2, fontsize=8)
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("fraction of test mentions")
    axes.set_title(title, fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path)
    return path


def plot_training_curves(log_rows: list[dict], path: str, title: str) -> str | None:
    """Training loss and dev MRR / Hits@1 against the optimiser step, from a run's log.jsonl; None without them."""
    from matplotlib.figure import Figure

    loss = [(row["step"], row["train/loss"]) for row in log_rows if "train/loss" in row]
    dev = [row for row in log_rows if "val/mrr" in row]
    if not loss and not dev:
        return None
    figure = Figure(figsize=(8, 3.2), dpi=120, layout="constrained")
    left, right = figure.subplots(1, 2)
    if loss:
        left.plot(*zip(*loss), marker="o", markersize=3)
    left.set_xlabel("optimiser step")
    left.set_ylabel("training loss")
    left.set_title("training loss (epoch mean)", fontsize=10)
    for key, label in (("val/mrr", "dev MRR"), ("val/hits@1", "dev Hits@1")):
        points = [(row["step"], row[key]) for row in dev if key in row]
        if points:
            right.plot(*zip(*points), marker="o", markersize=3, label=label)
    test = [row for row in log_rows if "test/mrr" in row]
    if test:
        right.scatter([test[-1]["step"]], [test[-1]["test/mrr"]], marker="*", s=80, color="black", label="test MRR",
                      zorder=3)
    right.set_ylim(0, 1.02)
    right.set_xlabel("optimiser step")
    right.set_title("evaluation", fontsize=10)
    right.legend(fontsize=8, loc="lower right")
    figure.suptitle(title, fontsize=10)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path)
    return path


# ---------------------------------------------------------------------------------------------------- text


def _usage(model_id: str, model_dir: str, examples: list[dict]) -> str:
    """Usage snippets for `model_id`; each one runs as written (the tests run them against a local folder)."""
    mid = json.dumps(model_id)
    has_index = os.path.isfile(os.path.join(model_dir, "entity_index.json"))
    entities = {e["id"]: e for e in _read_jsonl(os.path.join(model_dir, "entities.jsonl"))}
    example = examples[0] if examples else None
    parts = [textwrap.dedent("""\
        The model's code comes with it (`trust_remote_code=True`); it needs PyTorch 2.6 or newer and transformers 5.24 or
        newer (`pip install "torch>=2.6" "transformers>=5.24,<6" pillow`).
        """)]
    if has_index and example:
        parts.append(textwrap.dedent(f"""\
            The `{TASK}` pipeline links mentions against the knowledge base indexed in this repository
            ({len(entities) or 'its'} entities; the index and their names, descriptions and images ship with the model):

            ```python
            from transformers import pipeline
            from transformers.utils import cached_file

            linker = pipeline("{TASK}", model={mid}, trust_remote_code=True)
            image = cached_file({mid}, {json.dumps(example["image"])})  # an example mention image shipped with the model
            mention = {{"mention": {json.dumps(example["mention"])}, "text": {json.dumps(example["text"])}, "image": image}}
            for entity in linker(mention, top_k=3):
                print(entity["rank"], entity["id"], entity["name"], round(entity["score"], 3), round(entity["probability"], 3))
            ```

            Give one mention or a list (`batch_size=` batches them); `image` may be a path, a URL, a `PIL.Image`, bytes or
            base64, or left out. `device="cuda"` and `dtype=torch.bfloat16` work as for any pipeline. Link against another
            KB with `index=` (a folder saved with `EntityIndex.save`, or a list of `{{"id", "name", "description", "image"}}`
            dicts, indexed on the spot). An unreadable image raises a `ValueError`; `unreadable_image="zero"` scores it with
            an all-zero image instead, as the evaluation does. Every entity is scored by default; for a KB of millions,
            `candidates=1000` scores exactly only the 1,000 with the best cheap estimate (dot products, no attention) and
            returns the best of those (approximate; `probability` is then over the candidates).
            """))
    names, descriptions = ["Paris Hilton", "Paris"], ["American media personality", "capital of France"]
    mention, text, image_line, image_arg = "Paris", "Paris arrives at the premiere.", "", "None"
    if example:
        mention, text = example["mention"], example["text"]
        image_line = f"image = cached_file({mid}, {json.dumps(example['image'])})\n"
        image_arg = "image"
        picked = [entities[e] for e in [example.get("answer"), *entities] if e in entities][:3]
        picked = list({e["id"]: e for e in picked}.values())
        if len(picked) >= 2:
            names = [e.get("name") or "" for e in picked]
            descriptions = [e.get("description") or "" for e in picked]
    parts.append(textwrap.dedent("""\
        The model and processor on their own score mentions against any entities:

        ```python
        import torch
        from transformers import AutoModel, AutoProcessor
        from transformers.utils import cached_file

        model = AutoModel.from_pretrained({mid}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({mid}, trust_remote_code=True)
        {image_line}inputs = processor(
            mentions=[{mention}], sentences=[{text}], images=[{image_arg}],
            entity_names={names},
            entity_descriptions={descriptions},
        )
        with torch.no_grad():
            scores = model(**inputs).logits  # (mentions, entities): M3EL's final score
        print(scores)
        ```
        """).format(mid=mid, image_line=image_line, mention=json.dumps(mention), text=json.dumps(text),
                    image_arg=image_arg, names=json.dumps(names), descriptions=json.dumps(descriptions)))
    index_option = "" if has_index else " --index INDEX"  # this folder has no entity index: one built with m3el index
    if example:  # the example's image: in the folder, or on the Hub (`m3el link` reads paths and URLs)
        # a folder (maybe not built yet), or a Hub id "namespace/name"
        local = (os.path.isdir(model_id) or os.path.isabs(model_id) or model_id.startswith((".", "~"))
                 or model_id.count("/") != 1)
        image = (os.path.join(model_id, example["image"]) if local
                 else f"https://huggingface.co/{model_id}/resolve/main/{example['image']}")
        command = (f"m3el link --model {shlex.quote(model_id)}{index_option} --mention "
                   f"{shlex.quote(example['mention'])} --text {shlex.quote(example['text'])} "
                   f"--image {shlex.quote(image)} --top-k 5")
    else:
        command = (f'm3el link --model {shlex.quote(model_id)}{index_option} --mention "Jaguar" --text "the Jaguar at '
                   'the zoo today" --top-k 5')
    where = "" if has_index else (
        f" and an entity index of your KB (`m3el index --model {shlex.quote(model_id)} --data KB_FOLDER --output "
        "INDEX`; `m3el export` builds a folder that carries one)")
    parts.append(textwrap.dedent(f"""\
        From the command line, with the `m3el` package installed{where}:

        ```bash
        {command}
        ```
        """))
    return "\n".join(parts)


def _endpoint_line(model_dir: str) -> str:
    if not os.path.isfile(os.path.join(model_dir, "handler.py")):
        return ("- **Inference Endpoints**: `m3el export --run RUN --output FOLDER --repo-id ...` builds the folder to "
                "publish, with the entity index, the pipeline and a custom `handler.py` for Inference Endpoints.")
    return textwrap.dedent("""\
        - **Inference Endpoints**: this repository's `handler.py` is a custom handler over the pipeline. Requests are
          `{"inputs": {"mention": ..., "text": ..., "image": "<base64>"}, "parameters": {"top_k": 5}}` (or a list of
          mentions; `"candidates": K` among the parameters as in the pipeline); a bad request (a missing field, empty
          text, an unreadable image, `top_k` <= 0) gets `{"error": ...}`.""")


def _results_table(results: dict) -> str:
    rows = [f"| {name} | {results[key]:.4f} |" for key, (_, name) in METRICS.items() if key in results]
    rows += [f"| Hits@{k} | {value:.4f} |" for k, value in _hits_at(results)]
    return "| metric | value |\n|---|---|\n" + "\n".join(rows)


def _hyperparameters(training_config: dict) -> str:
    rows = [f"| `{key}` | `{json.dumps(training_config[key])}` |" for key in HYPERPARAMETERS if key in training_config]
    return "| hyperparameter | value |\n|---|---|\n" + "\n".join(rows)


def model_card(
    model_dir: str | os.PathLike,
    *,
    log_path: str | os.PathLike | None = None,
    model_id: str | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    plots: bool = True,
) -> ModelCard:
    """
    The card of the trained model in `model_dir` (a training run's `model/` or a folder built by `publish`), from its
    `config.json`, `test_results.json`, `training_config.json` and, when present, `entity_index.json`,
    `entities.jsonl` and `examples.jsonl`.

    Args:
        log_path: the run's `log.jsonl` (default: `log.jsonl` in `model_dir` or its parent), for the training curves.
        model_id: what the usage snippets load (a Hub repo id); defaults to `model_dir`'s absolute path.
        dataset_name: the benchmark's name (default: from the run's config; `m3el-demo` for the built-in demo).
        dataset_id: the benchmark's Hub dataset id, if it has one (the card's `datasets` and model-index).
        plots: write `plots/hits_at_k.png` and `plots/training_curves.png` into `model_dir` and embed them
            (needs matplotlib).
    """
    model_dir = os.path.abspath(model_dir)
    config = _read_json(os.path.join(model_dir, "config.json"), {})
    results = _read_json(os.path.join(model_dir, "test_results.json"), {})
    training_config = _read_json(os.path.join(model_dir, "training_config.json"), {})
    index_meta = _read_json(os.path.join(model_dir, "entity_index.json"), {})
    examples = _read_jsonl(os.path.join(model_dir, EXAMPLES_FILE))
    if log_path is None:
        candidates = [os.path.join(model_dir, "log.jsonl"), os.path.join(os.path.dirname(model_dir), "log.jsonl")]
        log_path = next((path for path in candidates if os.path.isfile(path)), None)
    log_rows = _read_jsonl(log_path)
    dataset_name = dataset_name or dataset_name_of(training_config)
    model_id = model_id or model_dir
    model_name = f"M3EL ({dataset_name})"

    figures = []
    if plots and results:
        try:
            plot_hits_at_k(results, os.path.join(model_dir, HITS_PLOT), f"{model_name}: test Hits@k")
            figures.append(f"![Hits@k on the test split]({HITS_PLOT})")
            if plot_training_curves(log_rows, os.path.join(model_dir, CURVES_PLOT), f"{model_name}: training"):
                figures.append(f"![Training loss and dev metrics]({CURVES_PLOT})")
        except ImportError:  # matplotlib is optional: the card keeps its tables
            figures.append("*(Plots need matplotlib: `pip install matplotlib`.)*")

    clip = config.get("clip_config", {})
    backbone = training_config.get("clip") or ("a tiny CLIP built from code (the demo)" if training_config else "CLIP")
    branches = [name for name, on in (("text", config.get("use_text_matching", True)),
                                      ("image", config.get("use_image_matching", True)),
                                      ("cross-modal", config.get("use_cross_modal_matching", True))) if on]
    count = results.get("count")
    entities = index_meta.get("num_entities")
    against = f"against all {entities} entities of the KB" if entities else "against the whole KB"
    demo_note = (
        "\n- **This is the demo model**: a tiny CLIP trained from scratch on the synthetic demo benchmark (coloured "
        "shapes, generated sentences). It shows the machinery working end to end and is of no use on real data."
        if dataset_name == DEMO_DATASET else ""
    )
    best_epoch, best_step = results.get("best_epoch"), results.get("best_step")
    best = ""
    if best_epoch is not None and best_step is not None and best_step >= 0:  # (-1: resumed from an older checkpoint)
        best = f"; best dev MRR at optimiser step {best_step}, in epoch {best_epoch + 1} (counted from 1)"
    elif best_epoch is not None:
        best = f"; best dev MRR after epoch {best_epoch + 1} (counted from 1)"
    body = f"""
# {model_name}

[M3EL]({PAPER_URL}) (Multi-level Matching Network for Multimodal Entity Linking, KDD 2025) links a *mention*, a
name in a sentence with the image posted alongside, to the entity of a knowledge base it refers to. It encodes
mentions and entities with one shared CLIP and scores every (mention, entity) pair with textual, visual and
cross-modal matching blocks; the gold entity should rank first.

This checkpoint was trained with `train_accelerate.py` of the `m3el` package from **{backbone}** on **{dataset_name}**: cross-modal mode `{config.get("cross_modal", "text_to_image")}`, matching width
{config.get("matching_dim", "?")}, branches {", ".join(branches)}, CLIP projection width
{clip.get("projection_dim", "?")}, texts of {config.get("text_max_length", "?")} tokens.

## Results

Test split of {dataset_name}{f", {count} mentions" if count else ""}, each ranked {against} (ties count against the
gold entity){best}.

{_results_table(results) if results else "*No test results in this folder.*"}

{chr(10).join(figures)}

## Usage

{_usage(model_id, model_dir, examples)}
## Serving

{_endpoint_line(model_dir)}
- **Gradio Space**: `hub_card/space/app.py` of the m3el package; set `M3EL_MODEL` to this repository.

The Hub's hosted inference widget does not run models with custom code, hence these two.

## Training

{_hyperparameters(training_config) if training_config else "*No training configuration in this folder.*"}

The loss is the paper's: cross-entropy of the final and of every branch score over in-batch negatives, plus the
intra-modal contrastive loss; the model kept is the one with the best dev MRR.

<details><summary>Full training configuration</summary>

```json
{json.dumps(training_config, indent=1)}
```

</details>

## Limitations

- It only links to entities of the index it is given, and always returns its best `top_k`: there is no NIL
  detection (mentions of entities outside the KB were left out of training and evaluation, as in the benchmarks).
- `probability` is the softmax of the scores over the whole KB, not a calibrated confidence.
- Texts are cut to {config.get("text_max_length", 40)} tokens (mention, separator and sentence together); entities are
  represented by their first image only.
- The benchmarks come from Wikipedia, Wikidata and news; their coverage, languages (English) and biases carry over to
  the model.{demo_note}

## Citation

```bibtex
{CITATION}
```
"""
    data = card_data(results, training_config, model_name, dataset_name, dataset_id)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(model_dir: str | os.PathLike, **kwargs) -> str:
    """Write `model_card(model_dir, **kwargs)` as `model_dir/README.md` (and its plots); returns the path."""
    card = model_card(model_dir, **kwargs)
    path = os.path.join(model_dir, "README.md")
    card.save(path)
    return path


__all__ = ["CITATION", "PIPELINE_TAG", "TAGS", "card_data", "eval_results", "model_card", "plot_hits_at_k",
           "plot_training_curves", "write_model_card"]
