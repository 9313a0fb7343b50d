"""Train, evaluate and export M3EL with Accelerate: `accelerate launch train_accelerate.py [--config configs/X.yaml]`.

With no arguments it trains a tiny M3EL on the built-in demo benchmark (generated on first use), on CPU or GPU, in
a few minutes. The configs in `configs/` carry the published recipe (the paper's; README, "Train or fine-tune") for
WikiMEL, RichpediaMEL and WikiDiverse; any config field can be overridden on the command line (`--learning_rate 2e-5`).
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import types
import typing
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.checkpointing import save_custom_state
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from modeling_m3el import M3ELModel, M3ELProcessor
from modeling_m3el.data import UniqueGoldBatchSampler, load_benchmark, process_training_batch
from modeling_m3el.evaluation import gold_ranks, index_rows, ranking_metrics
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.model_card import write_model_card

logger = logging.getLogger("m3el.train")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.yaml")


@dataclass
class TrainingConfig:
    # data
    dataset_dir: str | None = None  # benchmark or JSON Lines folder; None: the built-in demo, written to demo_dir
    demo_dir: str = "m3el-demo-data"
    demo_seed: int = 0
    # model
    clip: str | None = None  # CLIP to start from (Hub id or folder); None: a tiny CLIP built from code (the demo)
    init_from: str | None = None  # a saved M3EL folder to fine-tune instead of starting from CLIP
    cross_modal: str = "text_to_image"  # text_to_image: WikiMEL, RichpediaMEL; bidirectional: WikiDiverse
    matching_dim: int = 96
    use_text_matching: bool = True
    use_image_matching: bool = True
    use_cross_modal_matching: bool = True
    use_icl: bool = True
    tiny_hidden_size: int = 32  # demo backbone width
    tiny_image_size: int = 32  # demo image size
    # LoRA on CLIP's attention (the matching network stays fully trained); merged into CLIP on export
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    # recompute each CLIP layer's activations in the backward pass instead of keeping them: less memory, more time
    # (the same gradients); transformers' `activation_checkpointing_enable`
    activation_checkpointing: bool = False
    # optimisation: the published recipe (configs/wikimel.yaml)
    seed: int = 43
    num_epochs: int = 20
    per_device_batch_size: int = 128
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-4
    weight_decay: float = 1e-4  # 0 on biases and LayerNorms
    max_train_steps: int | None = None  # stop after this many optimiser steps (smoke runs)
    # evaluation
    eval_every_epochs: int = 2
    early_stopping_patience: int = 3  # evaluations without a better dev MRR before stopping
    eval_batch_size: int = 64
    entity_batch_size: int = 256
    num_workers: int = 0  # DataLoader processes for training batches; threads reading images for evaluation
    # output
    output_dir: str = "m3el-demo"
    checkpointing_steps: int | None = None  # also checkpoint every N optimiser steps, not only every epoch
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"
    overwrite_output_dir: bool = False  # start over in an output_dir holding an earlier run's checkpoints (deleted)
    report_to: str | None = None  # an Accelerate tracker ("tensorboard", "wandb", ...); a JSON Lines log always


def parse_args(argv=None) -> TrainingConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML file of TrainingConfig fields")
    for spec in dataclasses.fields(TrainingConfig):
        base = spec.type
        if typing.get_origin(base) in (typing.Union, types.UnionType):  # `X | None`: X
            base = next(a for a in typing.get_args(base) if a is not type(None))
        if typing.get_origin(base) is list:
            parser.add_argument(f"--{spec.name}", nargs="+", default=argparse.SUPPRESS)
        else:
            kind = {bool: _parse_bool, int: int, float: float, str: str}[base]
            parser.add_argument(f"--{spec.name}", type=_none_or(kind), default=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    values = {}
    config_path = args.pop("config")
    if config_path:
        with open(config_path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        unknown = set(values) - {spec.name for spec in dataclasses.fields(TrainingConfig)}
        if unknown:
            parser.error(f"{config_path}: unknown fields {', '.join(sorted(unknown))}")
    values.update(args)
    # Set on purpose: on the command line, or in a config file given with --config (not the demo's defaults).
    chosen = set(args) | (set(values) if config_path and config_path != DEFAULT_CONFIG else set())
    config = TrainingConfig(**values)
    # Sanity checks.
    if config.cross_modal not in ("text_to_image", "bidirectional"):
        parser.error(f"--cross_modal must be text_to_image or bidirectional, got {config.cross_modal!r}")
    for name in ("num_epochs", "per_device_batch_size", "gradient_accumulation_steps", "eval_every_epochs",
                 "eval_batch_size", "entity_batch_size", "checkpoints_total_limit"):
        if getattr(config, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if config.per_device_batch_size < 2:
        parser.error("--per_device_batch_size must be at least 2: the loss uses in-batch negatives")
    if config.dataset_dir is not None and not os.path.isdir(config.dataset_dir):
        parser.error(f"--dataset_dir {config.dataset_dir} is not a folder")
    if config.clip is not None and config.init_from is not None:
        parser.error("give --clip (start from CLIP) or --init_from (fine-tune an M3EL folder), not both")
    if config.init_from is not None:
        _take_architecture(config, chosen, parser)
    return config


ARCHITECTURE_FIELDS = (
    "cross_modal", "matching_dim", "use_text_matching", "use_image_matching", "use_cross_modal_matching", "use_icl",
)


def _take_architecture(config: TrainingConfig, chosen: set, parser) -> None:
    """
    With --init_from, the model is the folder's: its architecture fields replace the config's (so that the run's
    training_config.json and model card say what was trained), and one set on purpose to another value is an error
    rather than silently ignored.
    """
    from modeling_m3el import M3ELConfig

    try:
        saved = M3ELConfig.from_pretrained(config.init_from)
    except OSError as error:
        parser.error(f"--init_from {config.init_from}: not an M3EL folder or Hub repo ({error})")
    conflicts = [f"--{name} {getattr(config, name)} (the folder's model: {getattr(saved, name)})"
                 for name in ARCHITECTURE_FIELDS if name in chosen and getattr(config, name) != getattr(saved, name)]
    if conflicts:
        parser.error(f"--init_from {config.init_from} fine-tunes that model as it is built, so it conflicts with "
                     f"{'; '.join(conflicts)}: drop these options, or start from CLIP (--clip) to build another")
    for name in ARCHITECTURE_FIELDS:
        setattr(config, name, getattr(saved, name))


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(kind):
    def parse(text):
        return None if text.lower() in ("none", "null") else kind(text)

    return parse


# ------------------------------------------------------------------------------------------------ model setup


def build_model_and_processor(config: TrainingConfig):
    overrides = dict(
        cross_modal=config.cross_modal,
        matching_dim=config.matching_dim,
        use_text_matching=config.use_text_matching,
        use_image_matching=config.use_image_matching,
        use_cross_modal_matching=config.use_cross_modal_matching,
        use_icl=config.use_icl,
    )
    if config.init_from is not None:
        model = M3ELModel.from_pretrained(config.init_from, dtype=torch.float32)
        return model, M3ELProcessor.from_pretrained(config.init_from)
    if config.clip is None:  # the demo: a tiny CLIP and a tokenizer built from code
        from modeling_m3el.demo import demo_processor
        from modeling_m3el.tiny import tiny_clip_config

        processor = demo_processor(image_size=config.tiny_image_size)
        clip_config = tiny_clip_config(
            processor.tokenizer, image_size=config.tiny_image_size, hidden=config.tiny_hidden_size
        )
        from modeling_m3el import M3ELConfig

        return M3ELModel(M3ELConfig(clip_config=clip_config, **overrides)), processor
    from transformers import CLIPImageProcessor, CLIPTokenizer

    model = M3ELModel.from_clip(config.clip, **overrides)
    tokenizer = CLIPTokenizer.from_pretrained(config.clip)
    if len(tokenizer) < 1000:  # transformers builds an almost empty tokenizer from a folder without tokenizer files
        raise ValueError(f"{config.clip} provides no usable CLIP tokenizer ({len(tokenizer)} tokens)")
    return model, M3ELProcessor(CLIPImageProcessor.from_pretrained(config.clip), tokenizer)


def apply_lora(model: M3ELModel, config: TrainingConfig) -> None:
    """LoRA adapters on CLIP's attention projections; CLIP's own weights frozen, the matching network trained."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
    )
    model.clip = get_peft_model(model.clip, lora)


def merge_lora(model: M3ELModel) -> M3ELModel:
    from peft import PeftModel

    if isinstance(model.clip, PeftModel):
        model.clip = model.clip.merge_and_unload()
    return model


def optimizer_groups(model: torch.nn.Module, weight_decay: float):
    """AdamW groups of the recipe: weight decay on weights, none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = "norm" in name.lower() or "layer_norm" in name
        (no_decay if name.endswith(".bias") or is_norm else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------- batches


class ProcessShare(torch.utils.data.Sampler):
    """This process's slice of every global batch of a batch sampler, from the `skip`-th batch on (resume)."""

    def __init__(self, batch_sampler, rank: int, world: int, per_device: int):
        self.batch_sampler, self.rank, self.world, self.per_device = batch_sampler, rank, world, per_device
        self.skip = 0

    def __iter__(self):
        for number, batch in enumerate(self.batch_sampler):
            if number >= self.skip:
                yield batch[self.rank * self.per_device : (self.rank + 1) * self.per_device]

    def __len__(self):
        return len(self.batch_sampler) - self.skip


class TrainingCollator:
    """Mention rows and their gold entities -> an aligned batch. Each gold entity's image draw is seeded by
    (seed, epoch, mention), so it does not depend on how a global batch is split across processes."""

    def __init__(self, processor, mentions, entities, entity_row, seed: int):
        self.processor, self.mentions, self.entities, self.entity_row = processor, mentions, entities, entity_row
        self.seed = seed
        self.epoch = 0

    def __call__(self, indices):
        rows = self.mentions[indices]
        gold = self.entities[[self.entity_row[answer] for answer in rows["answer"]]]
        seeds = [np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0] for i in indices]
        before = self.processor.num_unreadable_images  # (this process's processor: a DataLoader worker has its own)
        batch = process_training_batch(self.processor, rows, gold, seeds=seeds)
        batch["num_unreadable_images"] = self.processor.num_unreadable_images - before  # popped before the model
        return batch


class IdentityDataset(torch.utils.data.Dataset):
    """A dataset whose items are their indices: the collator fetches rows in one batched read."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return index


# ------------------------------------------------------------------------------------------ training state


@dataclass
class TrainingState:
    """What resuming needs beyond model, optimizer and RNG states (Accelerate checkpoints those)."""

    epoch: int = 0  # the epoch in progress
    step_in_epoch: int = 0  # batches of `epoch` already done
    global_step: int = 0
    global_batch: int = 0  # mentions per optimiser step's batch, over every process (checked on resume)
    best_mrr: float = -1.0
    best_epoch: int = -1
    best_step: int = -1  # the optimiser step of the best model (its epoch may be partial: a max_train_steps stop)
    evaluations_without_improvement: int = 0
    history: list = field(default_factory=list)
    # The finished epoch whose dev evaluation is owed (-1: none). The epoch's checkpoint is taken before its
    # evaluation, so a crash or kill during the evaluation (an out-of-memory error, say) loses no training: the
    # resumed run evaluates first. The evaluation's outcome then replaces this state in that checkpoint.
    eval_due: int = -1
    # The evaluation found a better model, which `best_model/` does not hold yet: written from the checkpoint's
    # weights (those evaluated) after the state saying so, so that a crash between the two cannot leave `best_model/`
    # and `best_epoch` disagreeing.
    best_due: bool = False

    def state_dict(self):
        return dataclasses.asdict(self)

    def load_state_dict(self, state):
        for key, value in state.items():
            setattr(self, key, value)


def checkpoint_dirs(output_dir: str) -> list[str]:
    folder = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.startswith("step_") and n[5:].isdigit()]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[5:]))]


def save_checkpoint(accelerator, config: TrainingConfig, state: TrainingState) -> str:
    """
    Atomic: written to a temporary folder, then renamed; a crash never leaves a half checkpoint as `latest`. A
    checkpoint of the same step already there is moved aside first and deleted last. Returns the checkpoint's folder.
    """
    final = os.path.join(config.output_dir, "checkpoints", f"step_{state.global_step:08d}")
    temporary = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(temporary):
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(temporary)
    if accelerator.is_main_process:
        with open(os.path.join(temporary, "training_config.json"), "w") as f:
            json.dump(dataclasses.asdict(config), f, indent=1)
        replaced = final + ".old"
        shutil.rmtree(replaced, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, replaced)
        os.replace(temporary, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in checkpoint_dirs(config.output_dir)[: -config.checkpoints_total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# What a resumed run may change: how long it runs, how and how often it evaluates, checkpoints and reports. Anything
# else (data, model, batches, optimiser) would make the resumed run another run than the one checkpointed.
RESUMABLE_CHANGES = {
    "num_epochs", "max_train_steps", "eval_every_epochs", "early_stopping_patience", "eval_batch_size",
    "entity_batch_size", "num_workers", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "report_to", "output_dir", "activation_checkpointing", "overwrite_output_dir",
}
PATH_FIELDS = {"dataset_dir", "demo_dir", "clip", "init_from"}  # compared as absolute paths when local folders


def start_output_dir(accelerator, config: TrainingConfig) -> None:
    """
    A new run (not resumed) must not mix with an earlier one in the same output_dir: its checkpoints would be resumed
    by `latest` and rotated against this run's, its log rows drawn in this run's plots. So an earlier run's
    checkpoints or log are an error, unless `overwrite_output_dir` deletes them.
    """
    if config.resume_from_checkpoint:
        return
    earlier = checkpoint_dirs(config.output_dir)
    log = os.path.exists(os.path.join(config.output_dir, "log.jsonl"))
    if (earlier or log) and not config.overwrite_output_dir:
        if earlier:
            what = f"the checkpoints of an earlier run ({', '.join(map(os.path.basename, earlier))})"
            how = "resume it with --resume_from_checkpoint latest, start over"
        else:
            what, how = "the log of an earlier run (log.jsonl)", "start over"
        raise ValueError(f"{config.output_dir} holds {what}: {how} with --overwrite_output_dir true (deletes them "
                         "and its log), or choose another --output_dir")
    accelerator.wait_for_everyone()  # every process has looked before the main one deletes
    if accelerator.is_main_process:
        shutil.rmtree(os.path.join(config.output_dir, "checkpoints"), ignore_errors=True)
        for name in ("log.jsonl", "test_results.json"):
            if os.path.exists(os.path.join(config.output_dir, name)):
                os.remove(os.path.join(config.output_dir, name))
    accelerator.wait_for_everyone()


def save_training_state(accelerator, config: TrainingConfig, state: TrainingState, folder: str | None) -> str:
    """
    After a dev evaluation: replace the training state in `folder`, the checkpoint taken before it, by `state`,
    atomically (written beside it, then renamed over it). Model, optimiser and RNG states are left as they are: an
    evaluation does not change them. `state` is the only object registered for checkpointing: Accelerate keeps it
    as `custom_checkpoint_0.pkl`. A checkpoint outside this run's output_dir (resumed from another folder) is not
    written to: a whole checkpoint is saved in output_dir instead. Returns the checkpoint's folder.
    """
    own = os.path.join(config.output_dir, "checkpoints", f"step_{state.global_step:08d}")
    if folder is None or not (os.path.isdir(own) and os.path.isdir(folder) and os.path.samefile(folder, own)):
        return save_checkpoint(accelerator, config, state)
    if accelerator.is_main_process:
        temporary = folder + ".state.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
        save_custom_state(state, temporary, 0)
        os.replace(os.path.join(temporary, "custom_checkpoint_0.pkl"), os.path.join(folder, "custom_checkpoint_0.pkl"))
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    return folder


def trim_log(output_dir: str, global_step: int, eval_due: bool = False) -> None:
    """
    Keep the log's rows up to the resumed checkpoint's step (their work is in it), and no test rows; with `eval_due`
    (the checkpoint's dev evaluation did not finish), no dev rows of its step either: the evaluation is redone.
    """
    path = os.path.join(output_dir, "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def redone(row):
        return row["step"] > global_step or any(key.startswith("test/") for key in row) or (
            eval_due and row["step"] == global_step and any(key.startswith("val/") for key in row))

    kept = [row for row in rows if not redone(row)]
    if len(kept) != len(rows):
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(f"{path}.tmp", path)
        logger.info("log.jsonl: %d rows after the checkpoint's step %d dropped (their work is redone)",
                    len(rows) - len(kept), global_step)


def check_resumable(path: str, config: TrainingConfig) -> None:
    """Refuse to resume a checkpoint with settings other than those it was trained with (its training_config.json)."""
    try:
        with open(os.path.join(path, "training_config.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: its training_config.json cannot be read ({error}): not a checkpoint of this "
                         "script, or an interrupted save") from None
    current = dataclasses.asdict(config)

    def same(name):
        paths = (saved[name], current[name])
        if name in PATH_FIELDS and all(isinstance(path, str) and os.path.exists(path) for path in paths):
            return os.path.samefile(*paths)
        return saved[name] == current[name]

    changed = [f"{name} {saved[name]!r} -> {current[name]!r}" for name in current
               if name in saved and name not in RESUMABLE_CHANGES and not same(name)]
    if changed:
        raise ValueError(f"{path} was trained with other settings than this run's: {'; '.join(changed)}. Resume with "
                         "the checkpoint's settings, or start a new run (another --output_dir)")


def save_model_folder(model: M3ELModel, processor, folder: str, extra_files: dict | None = None) -> None:
    """save_pretrained into a temporary sibling, then rename over `folder`: readers never see half a model."""
    temporary = folder.rstrip("/") + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    processor.save_pretrained(temporary)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(temporary, name), "w") as f:
            f.write(content)
    backup = folder.rstrip("/") + ".old"
    shutil.rmtree(backup, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, backup)
    os.replace(temporary, folder)
    shutil.rmtree(backup, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ evaluation


def evaluate_split(accelerator, model, processor, benchmark, split: str, config: TrainingConfig) -> dict:
    model.eval()
    entities = index_rows(benchmark.entities)
    with accelerator.autocast():
        index = EntityIndex.build(
            model, processor, entities, batch_size=config.entity_batch_size,
            progress=accelerator.is_local_main_process, accelerator=accelerator, num_workers=config.num_workers,
        )
        ranks = gold_ranks(
            model, processor, index, benchmark.splits[split], batch_size=config.eval_batch_size,
            accelerator=accelerator, progress=accelerator.is_local_main_process, description=f"Ranking {split}",
            num_workers=config.num_workers,
        )
    metrics = ranking_metrics(ranks)
    model.train()
    return metrics


def log_metrics(accelerator, config: TrainingConfig, metrics: dict, step: int) -> None:
    if config.report_to:
        accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(config.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


# ------------------------------------------------------------------------------------------------------ main


def main(argv=None):
    config = parse_args(argv)

    # 1. Accelerator, logging, seed (offset by rank only where randomness must differ: nowhere here, since every
    #    process draws the same global batches and takes its share).
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to,
        project_dir=config.output_dir,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(config.seed)
    os.makedirs(config.output_dir, exist_ok=True)
    start_output_dir(accelerator, config)

    # 2. Data: the demo is generated once (main process first), then every process loads the same folder.
    with accelerator.main_process_first():
        dataset_dir = config.dataset_dir
        if dataset_dir is None:
            from modeling_m3el.demo import write_demo_benchmark

            dataset_dir = write_demo_benchmark(config.demo_dir, seed=config.demo_seed)
        benchmark = load_benchmark(dataset_dir)  # (the demo's folder loads under its own name)
    logger.info(benchmark.summary())
    demo_model = config.clip is None and config.init_from is None
    if config.dataset_dir is not None and demo_model and accelerator.is_main_process:
        logger.warning(
            "Training on %s with the demo's model: a tiny CLIP built from code, trained from scratch (no --clip, "
            "no --init_from). For a real linker start from CLIP: --config configs/wikimel.yaml (the published recipe, "
            "CLIP ViT-B/32) or --clip openai/clip-vit-base-patch32", config.dataset_dir)
    benchmark.require_splits(("train", "dev", "test"))  # the file a missing split was looked for in, and why

    # 3. Model, processor, optimizer.
    model, processor = build_model_and_processor(config)
    if config.lora:
        apply_lora(model, config)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    # On CUDA the fused AdamW kernel (one launch for all parameters; the same update up to rounding).
    optimizer = torch.optim.AdamW(
        optimizer_groups(model, config.weight_decay), lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        fused=accelerator.device.type == "cuda" or None,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    # 4. Batches: global batches of distinct gold entities, each process taking its share of every one.
    world, per_device = accelerator.num_processes, config.per_device_batch_size
    train = benchmark.splits["train"]
    global_batch = per_device * world
    if len(train) < global_batch:
        raise ValueError(f"{len(train)} training mentions cannot fill one batch of {global_batch}")
    batch_sampler = UniqueGoldBatchSampler(train["answer"], global_batch, seed=config.seed, drop_last=True)
    if len(batch_sampler) == 0:
        raise ValueError(
            f"no batch of {global_batch} training mentions with {global_batch} different gold entities can be formed: "
            f"the {len(train)} training mentions have {len(set(train['answer']))} different gold entities (a batch "
            "never holds two mentions of one entity, the others being its negatives); lower --per_device_batch_size"
        )
    share = ProcessShare(batch_sampler, accelerator.process_index, world, per_device)
    collator = TrainingCollator(processor, train, benchmark.entities, benchmark.entity_index, config.seed)
    loader = torch.utils.data.DataLoader(
        IdentityDataset(len(train)), batch_sampler=share, collate_fn=collator, num_workers=config.num_workers
    )
    steps_per_epoch = math.ceil(len(batch_sampler) / config.gradient_accumulation_steps)

    state = TrainingState(global_batch=global_batch)
    accelerator.register_for_checkpointing(state)
    if config.report_to:
        accelerator.init_trackers("m3el", config=dataclasses.asdict(config))

    # 5. Resume.
    checkpoint = None  # the checkpoint holding the current state
    if config.resume_from_checkpoint:
        path = config.resume_from_checkpoint
        if path == "latest":
            found = checkpoint_dirs(config.output_dir)
            path = found[-1] if found else None
        if path is None:
            logger.warning("No checkpoint in %s to resume: starting from scratch", config.output_dir)
        else:
            check_resumable(path, config)
            accelerator.load_state(path)
            checkpoint = path
            if state.global_batch != global_batch:  # (the number of processes times the batch per device)
                raise ValueError(f"{path} was trained with batches of {state.global_batch} mentions over all "
                                 f"processes, this run's are {global_batch}: resume on as many processes as it was "
                                 "trained on")
            if accelerator.is_main_process:  # the log's rows of the work lost since the checkpoint
                trim_log(config.output_dir, state.global_step, eval_due=state.eval_due >= 0)
            logger.info("Resumed from %s: epoch %d, batch %d, step %d%s", path, state.epoch, state.step_in_epoch,
                        state.global_step, f" (epoch {state.eval_due}'s dev evaluation first)"
                        if state.eval_due >= 0 else "")

    # 6. Banner.
    left_out = batch_sampler.left_out
    if left_out > 0.05 * len(train) and accelerator.is_main_process:
        logger.warning(
            "%d of the %d training mentions (%.0f%%) are left out of each epoch (others each time): a batch never "
            "holds two mentions of one gold entity, so an entity's mentions beyond the epoch's %d batches cannot be "
            "placed (and a few others, to keep every batch full); a smaller batch usually leaves fewer out", left_out,
            len(train), 100 * left_out / len(train), len(batch_sampler))
    effective = per_device * world * config.gradient_accumulation_steps
    logger.info("***** Training M3EL *****")
    logger.info("  dataset: %s, %d train mentions (%d in each epoch's batches), %d entities", benchmark.name,
                len(train), len(train) - left_out, len(benchmark.entities))
    logger.info("  processes: %d, batch per device: %d, accumulation: %d -> effective batch %d (in-batch negatives "
                "per mention: %d)", world, per_device, config.gradient_accumulation_steps, effective, global_batch - 1)
    logger.info("  epochs: %d, optimiser steps per epoch: %d, mixed precision: %s, LoRA: %s, activation "
                "checkpointing: %s", config.num_epochs, steps_per_epoch, accelerator.mixed_precision, config.lora,
                config.activation_checkpointing)

    # 7. Train, evaluating on dev every few epochs, keeping the best model by dev MRR.
    best_dir = os.path.join(config.output_dir, "best_model")
    # A resumed run that had already stopped early (or reached max_train_steps) goes straight to the test, after
    # the dev evaluation its checkpoint still owes, if any.
    stop = state.evaluations_without_improvement >= config.early_stopping_patience or bool(
        config.max_train_steps and state.global_step >= config.max_train_steps
    )
    progress = tqdm(total=config.num_epochs * steps_per_epoch, initial=state.global_step, desc="Training",
                    disable=not accelerator.is_local_main_process)
    model.train()
    while True:
        if state.eval_due >= 0:
            epoch = state.eval_due
            metrics = evaluate_split(accelerator, unwrapped, processor, benchmark, "dev", config)
            log_metrics(accelerator, config, {f"val/{k}": v for k, v in metrics.items()}, state.global_step)
            logger.info("epoch %d: dev %s", epoch, _format(metrics))
            state.history.append({"epoch": epoch, "step": state.global_step, **metrics})
            if metrics["mrr"] > state.best_mrr:
                state.best_mrr, state.best_epoch, state.evaluations_without_improvement = metrics["mrr"], epoch, 0
                state.best_step = state.global_step
                state.best_due = True
            else:
                state.evaluations_without_improvement += 1
                if state.evaluations_without_improvement >= config.early_stopping_patience:
                    logger.info("No better dev MRR in %d evaluations: stopping", config.early_stopping_patience)
                    stop = True
            state.eval_due = -1
            checkpoint = save_training_state(accelerator, config, state, checkpoint)
        if state.best_due:
            if accelerator.is_main_process:
                save_model_folder(merge_lora_copy(unwrapped, config), processor, best_dir)
            state.best_due = False
            checkpoint = save_training_state(accelerator, config, state, checkpoint)
        if stop or state.epoch >= config.num_epochs:
            break
        batch_sampler.set_epoch(state.epoch)
        collator.epoch = state.epoch
        share.skip = state.step_in_epoch
        batches_in_epoch, accumulation = len(batch_sampler), config.gradient_accumulation_steps
        running, count, unreadable, started = 0.0, 0, 0, time.time()
        for batch in loader:
            unreadable += batch.pop("num_unreadable_images")
            batch = batch.to(accelerator.device)
            state.step_in_epoch += 1
            # An optimiser step every `gradient_accumulation_steps` batches and after the epoch's last one: no gradient
            # is carried into the next epoch, nor left out of the checkpoint taken at the epoch's end.
            step_now = state.step_in_epoch % accumulation == 0 or state.step_in_epoch == batches_in_epoch
            # The step averages its group's batches: the epoch's last group may be shorter than `accumulation`.
            group_start = (state.step_in_epoch - 1) // accumulation * accumulation
            group = min(accumulation, batches_in_epoch - group_start)
            with contextlib.nullcontext() if step_now else accelerator.no_sync(model):
                output = model(**batch, return_loss=True, gather_negatives=True)
                # (backward divides by `accumulation`)
                accelerator.backward(output.loss if group == accumulation else output.loss * (accumulation / group))
            running, count = running + output.loss.detach().float().item(), count + 1
            if step_now:
                optimizer.step()
                optimizer.zero_grad()
                state.global_step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{running / count:.4f}")
                if config.max_train_steps and state.global_step >= config.max_train_steps:
                    stop = True
                    break
                # (not at the epoch's last step: the epoch's checkpoint follows, with its evaluation owed, if any)
                if config.checkpointing_steps and state.global_step % config.checkpointing_steps == 0 and (
                    state.step_in_epoch < batches_in_epoch
                ):
                    checkpoint = save_checkpoint(accelerator, config, state)
        epoch_loss = accelerator.reduce(torch.tensor(running / max(count, 1), device=accelerator.device), "mean")
        unreadable = int(accelerator.reduce(torch.tensor(unreadable, device=accelerator.device), "sum").item())
        if unreadable and accelerator.is_main_process:
            logger.warning("epoch %d: %d images of its batches could not be read and were all-zero images (the "
                           "warnings name them)", state.epoch, unreadable)
        log_metrics(accelerator, config, {"train/loss": epoch_loss.item(), "train/epoch": state.epoch,
                                          "train/seconds": time.time() - started,
                                          "train/mentions_left_out": batch_sampler.left_out,
                                          "train/unreadable_images": unreadable}, state.global_step)
        finished_epoch = state.epoch
        if state.step_in_epoch >= batches_in_epoch:  # (max_train_steps can stop it part way: resumed from there)
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if (finished_epoch + 1) % config.eval_every_epochs == 0 or state.epoch == config.num_epochs or stop:
            state.eval_due = finished_epoch  # (done at the loop's top, once this checkpoint holds the epoch's work)
        checkpoint = save_checkpoint(accelerator, config, state)
    progress.close()
    accelerator.wait_for_everyone()

    # 8. Test the best model, export it with its processor, code, card and results.
    best = M3ELModel.from_pretrained(best_dir, dtype=torch.float32).to(accelerator.device)
    results = evaluate_split(accelerator, best, processor, benchmark, "test", config)
    log_metrics(accelerator, config, {f"test/{k}": v for k, v in results.items()}, state.global_step)
    if accelerator.is_main_process:
        final = os.path.join(config.output_dir, "model")
        files = {
            "test_results.json": json.dumps({**results, "best_epoch": state.best_epoch, "best_step": state.best_step},
                                            indent=1),
            "training_config.json": json.dumps(dataclasses.asdict(config), indent=1),
        }
        save_model_folder(best, processor, final, extra_files=files)
        write_model_card(final, log_path=os.path.join(config.output_dir, "log.jsonl"),
                         dataset_name=benchmark.name)
        with open(os.path.join(config.output_dir, "test_results.json"), "w") as f:
            f.write(files["test_results.json"])
        print(f"Test ({results['count']} mentions vs {len(benchmark.entities)} entities): {_format(results)}")
        print(f"Model, processor, code, card and test_results.json in {final}")
    accelerator.end_training()
    return results


def merge_lora_copy(model: M3ELModel, config: TrainingConfig) -> M3ELModel:
    """The model as it will be published: LoRA merged into CLIP (on a copy, training goes on with adapters)."""
    if not config.lora:
        return model
    import copy

    return merge_lora(copy.deepcopy(model))


def _format(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


if __name__ == "__main__":
    main()
