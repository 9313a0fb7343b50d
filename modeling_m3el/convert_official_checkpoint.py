"""Convert a checkpoint of the authors' M3EL code (their Lightning `LightningForM3EL`) into a Hub-ready M3EL folder.

The authors' checkpoint holds `state_dict` with `encoder.*` (`M3ELEncoder`: the CLIP model and two linear maps) and
`matcher.*` (`M3ELMatcher`: the matching network, plus modules that are built but never used in the forward pass:
`UNUSED_MODULES` below lists them). Every weight the model needs is mapped by name, checked for shape and loaded
strictly; the unused modules are dropped and listed; anything else is refused.

    python -m modeling_m3el.convert_official_checkpoint \\
        --checkpoint epoch=11-step=2268.ckpt --clip openai/clip-vit-base-patch32 \\
        --cross-modal text_to_image --output m3el-wikimel
"""

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, CLIPConfig

from .configuration_m3el import CROSS_MODAL_MODES, M3ELConfig
from .modeling_m3el import M3ELModel
from .processing_m3el import M3ELProcessor

# Our module -> the authors' module, outside the cross-modal block. A model key `ours.rest` reads `authors.rest`.
MODULE_MAP = {
    "clip": "encoder.clip",
    "image_embeds_proj": "encoder.image_cls_fc",  # Wvc: P -> d
    "image_tokens_proj": "encoder.image_tokens_fc",  # Wvt: Hv -> d
    "text_embeds_norm": "matcher.text_cls_layernorm",
    "text_tokens_norm": "matcher.text_tokens_layernorm",
    "image_embeds_norm": "matcher.image_cls_layernorm",
    "image_tokens_norm": "matcher.image_tokens_layernorm",
}
INTRA_MODAL_BLOCKS = {"text_matching": "matcher.timm", "image_matching": "matcher.iimm"}
INTRA_MODAL_LAYERS = {
    "query": "fc_query",
    "key": "fc_key",
    "value": "fc_value",
    "global_proj": "fc_cls",
    "context_norm": "layer_norm",
}
# The authors build both cross-modal blocks; a mode trains (and here converts) one of them.
CROSS_MODAL_BLOCKS = {"text_to_image": "matcher.cmm", "bidirectional": "matcher.cmmb"}
CROSS_MODAL_LAYERS = {
    "text_proj": "text_fc",
    "image_proj": "image_fc",
    "gate": "gate_fc",
    "gate_norm": "gate_layer_norm",
    "match.proj": "match_module.trans_linear",
    "fusion": "fusion_module.linear",  # text_to_image only; the bidirectional block has no fusion
}
# CSRA head weights of `MultiHeadModule`, created as ones and frozen in the authors' configs; fixed at 1 here.
CSRA_HEAD_WEIGHTS = "multi_head_module.weight"
# The authors' `MultiHeadModule.temp_settings`: CSRA temperatures by number of heads (5 in every published config).
CSRA_TEMPERATURES_BY_HEADS = {
    1: [3.0],
    2: [3.0, 99.0],
    3: [2.0, 4.0, 99.0],
    4: [2.0, 3.0, 4.0, 99.0],
    5: [2.0, 2.5, 3.5, 4.5, 99.0],
    6: [2.0, 3.0, 4.0, 5.0, 6.0, 99.0],
    7: [0.5, 2.5, 3.5, 4.5, 5.5, 6.5, 99.0],
    8: [0.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 99.0],
}
# Modules the authors' code builds but never uses to score or to train (patterns of their names). Together with the
# cross-modal block of the other mode, a conversion drops these and lists them.
UNUSED_MODULES = (
    r"matcher\.(?:cmm|cmmb)\.mclet_[^.]+",  # contrastive heads of the cross-modal blocks, never called
    r"matcher\.mclet_[^.]+",  # contrastive heads, never called
    r"matcher\.(?:text_fc|image_fc)",  # linear maps, never called
    r"matcher\.scale_[^.]+",  # LayerNorms, never called
    r"matcher\.weight_cl_loss\.logit_scale",  # the ICL loss divides by its fixed tau instead
    r"matcher\.infonce_loss",  # a loss module, never called
)
# Constant buffers that some transformers versions save and others do not; never taken from a checkpoint.
POSITION_IDS = re.compile(r"^clip\.(?:text|vision)_model\.embeddings\.position_ids$")
HUB_CODE_FILES = ("configuration_m3el.py", "modeling_m3el.py", "kernels_m3el.py")


class CheckpointConversionError(ValueError):
    """The checkpoint (or the CLIP it is paired with) cannot be converted faithfully."""


@dataclass
class ConversionReport:
    checkpoint: str
    output_dir: str
    cross_modal: str
    matching_dim: int
    num_mapped: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # authors' module -> number of tensors dropped
    checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    processor_written: bool = False
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"Converted {self.checkpoint} -> {self.output_dir}",
            f"  cross_modal={self.cross_modal}, matching_dim={self.matching_dim}",
            f"  mapped: {self.num_mapped} tensors, every model weight filled exactly once",
            f"  dropped (not used by this mode's forward pass): {sum(self.dropped.values())} tensors",
        ]
        other_blocks = {block: mode for mode, block in CROSS_MODAL_BLOCKS.items() if mode != self.cross_modal}
        lines += [f"    {module}: {count}" + (f" (the {other_blocks[module]} mode's cross-modal block)"
                                              if module in other_blocks else "")
                  for module, count in sorted(self.dropped.items())]
        lines.append("  checked:")
        lines += [f"    {check}" for check in self.checked]
        lines.append(f"  processor written: {'yes' if self.processor_written else 'no'}")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append(f"  files: {', '.join(self.files)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike, unsafe_load: bool = False) -> Mapping:
    """The checkpoint's dict, read with `weights_only=True` unless `unsafe_load` (only for a file you trust)."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointConversionError(f"{path}: no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not unsafe_load)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        if unsafe_load or not found:  # not a refused object: a file that is not a checkpoint, or a damaged one
            raise CheckpointConversionError(
                f"{path}: cannot be read as a PyTorch checkpoint (damaged, or not a checkpoint): {_first_line(error)}"
            ) from error
        raise CheckpointConversionError(
            f"{path}: torch.load(weights_only=True) refused a non-tensor object ({found.group(1)}). Lightning pickles "
            "the training arguments (`hyper_parameters`, an omegaconf DictConfig in the authors' code) next to the "
            "weights, and unpickling arbitrary objects can run code. If you trust this file, rerun with "
            "--unsafe-load (needs the packages those objects come from, e.g. omegaconf), or re-save it in a trusted "
            "environment with its training arguments as plain containers, which this converter checks the "
            "conversion against: ckpt = torch.load(path, weights_only=False); torch.save({'state_dict': "
            "ckpt['state_dict'], 'hyper_parameters': omegaconf.OmegaConf.to_container(ckpt['hyper_parameters'])}, "
            "'weights.ckpt')."
        ) from error
    except (RuntimeError, EOFError) as error:  # a truncated or damaged file (zip archive, pickle stream)
        raise CheckpointConversionError(
            f"{path}: cannot be read as a PyTorch checkpoint (truncated or damaged?): {_first_line(error)}"
        ) from error
    except ModuleNotFoundError as error:  # unsafe load of an object whose package is not installed
        raise CheckpointConversionError(
            f"{path}: unpickling needs the package {error.name!r}, which is not installed (the authors' checkpoints "
            "pickle omegaconf objects); install it, or re-save only the state_dict where it is installed"
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise CheckpointConversionError(f"{path}: expected a dict (a Lightning checkpoint), got {type(checkpoint)}")
    return checkpoint


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _state_dict(checkpoint: Mapping, path: str) -> dict[str, torch.Tensor]:
    state_dict = checkpoint.get("state_dict", checkpoint)  # a Lightning checkpoint, or a bare state dict
    if not isinstance(state_dict, Mapping) or not state_dict:
        raise CheckpointConversionError(f"{path}: no `state_dict` in the checkpoint")
    not_tensors = sorted(key for key, value in state_dict.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointConversionError(f"{path}: these state_dict entries are not tensors: {', '.join(not_tensors)}")
    if not any(key.startswith(("encoder.", "matcher.")) for key in state_dict):
        raise CheckpointConversionError(
            f"{path}: no `encoder.*` or `matcher.*` keys; this is not a checkpoint of the authors' LightningForM3EL"
        )
    return dict(state_dict)


def _hyper_parameter(checkpoint: Mapping, *names: str):
    """`hyper_parameters.<names...>` when readable (a dict, or an object with attributes), else None."""
    node = checkpoint.get("hyper_parameters")
    for name in names:
        if node is None:
            return None
        node = node.get(name) if isinstance(node, Mapping) else getattr(node, name, None)
    return node


# --------------------------------------------------------------------------------------------------- mapping


def module_map(cross_modal: str) -> dict[str, str]:
    """Our module -> the authors' module, for every module of `M3ELModel` in `cross_modal` mode."""
    modules = dict(MODULE_MAP)
    for ours, theirs in INTRA_MODAL_BLOCKS.items():
        modules.update({f"{ours}.{layer}": f"{theirs}.{name}" for layer, name in INTRA_MODAL_LAYERS.items()})
    block = CROSS_MODAL_BLOCKS[cross_modal]
    modules.update({f"cross_modal_matching.{layer}": f"{block}.{name}" for layer, name in CROSS_MODAL_LAYERS.items()})
    return modules


def authors_key(model_key: str, modules: dict[str, str]) -> str:
    """The authors' name of one `M3ELModel` state-dict key, given `module_map(...)`."""
    for ours in sorted(modules, key=len, reverse=True):  # longest prefix first
        if model_key.startswith(ours + "."):
            return modules[ours] + model_key[len(ours) :]
    raise KeyError(f"no authors' name for the model key {model_key!r}")


def _unused_module(key: str, cross_modal: str) -> str | None:
    """The unused authors' module holding `key`, or None when the key is not part of an unused module."""
    for mode, block in CROSS_MODAL_BLOCKS.items():
        if mode != cross_modal and key.startswith(block + "."):
            return block  # the other mode's cross-modal block: not used in this mode
    for pattern in UNUSED_MODULES:
        found = re.match(rf"({pattern})(?:\.|$)", key)
        if found:
            return found.group(1)
    return None


def _convert_state_dict(
    state_dict: dict[str, torch.Tensor], model: M3ELModel, cross_modal: str, path: str, report: ConversionReport
) -> dict[str, torch.Tensor]:
    """Our state dict from the authors', every model key filled exactly once; refuses anything it cannot explain."""
    modules = module_map(cross_modal)
    converted, missing, misshapen, used = {}, [], [], set()
    for model_key, target in model.state_dict().items():
        source = authors_key(model_key, modules)
        if POSITION_IDS.match(model_key):
            converted[model_key] = target  # a constant this transformers version saves: ours, checked below
            continue
        if source not in state_dict:
            missing.append(source)
            continue
        if state_dict[source].shape != target.shape:
            misshapen.append(f"{source}: expected {tuple(target.shape)}, found {tuple(state_dict[source].shape)}")
            continue
        converted[model_key] = state_dict[source]
        used.add(source)
    if missing:
        raise CheckpointConversionError(f"{path}: missing weights the model needs: {', '.join(missing)}")
    if misshapen:
        raise CheckpointConversionError(
            f"{path}: weights of unexpected shape (is --clip the CLIP this checkpoint was trained from?): "
            + "; ".join(misshapen)
        )

    # The CSRA head weights of the converted block are constants of our model: accept them only when they are 1.
    head_weights_key = f"{CROSS_MODAL_BLOCKS[cross_modal]}.{CSRA_HEAD_WEIGHTS}"
    if model.cross_modal_matching is not None:
        head_weights = state_dict.get(head_weights_key)
        num_heads = len(model.config.csra_temperatures)
        if head_weights is None:
            raise CheckpointConversionError(f"{path}: missing weights the model needs: {head_weights_key}")
        if head_weights.shape != (num_heads, 1):
            raise CheckpointConversionError(
                f"{path}: {head_weights_key}: expected {(num_heads, 1)}, found {tuple(head_weights.shape)}"
            )
        if not torch.all(head_weights == 1):
            raise CheckpointConversionError(
                f"{path}: {head_weights_key} = {head_weights.flatten().tolist()}, but M3EL fixes the CSRA head weights "
                "at 1 (the authors' default, frozen); converting would change the cross-modal scores"
            )
        used.add(head_weights_key)
        report.checked.append(f"{head_weights_key} == 1 ({num_heads} CSRA heads)")

    # CLIP's position_ids: saved by older transformers versions, rebuilt by CLIP itself; compared, never failed on.
    buffers = dict(model.named_buffers())
    for key in state_dict:
        if key.startswith("encoder.") and POSITION_IDS.match(key[len("encoder.") :]):
            ours, theirs = buffers[key[len("encoder.") :]], state_dict[key]
            same = theirs.shape == ours.shape and torch.equal(theirs.to(ours.dtype), ours)
            report.checked.append(f"{key}: {'equals' if same else 'differs from (ignored)'} the arange CLIP builds")
            used.add(key)

    unknown = []
    dropped = Counter()
    for key in state_dict:
        if key in used:
            continue
        module = _unused_module(key, cross_modal)
        if module is None:
            unknown.append(key)
        else:
            dropped[module] += 1
    if unknown:
        raise CheckpointConversionError(
            f"{path}: unexpected keys, neither used by M3EL nor known unused modules of the authors' code: "
            + ", ".join(sorted(unknown))
        )
    report.dropped = dict(dropped)
    report.num_mapped = sum(1 for key in converted if not POSITION_IDS.match(key))
    return converted


def _looks_untrained(state_dict: Mapping, cross_modal: str) -> str | None:
    """
    A note when the converted mode's cross-modal block still has its gate LayerNorm at its initial values (weight 1,
    bias 0) while the other mode's block has trained ones: the checkpoint was most likely trained in the other mode
    (its hyper-parameters, which say so, are often not in a weights-only file).
    """
    def initial(block):
        norm = f"{block}.{CROSS_MODAL_LAYERS['gate_norm']}"
        weight, bias = (state_dict.get(f"{norm}.{name}") for name in ("weight", "bias"))
        if weight is None or bias is None:
            return None
        return bool((weight == 1).all() and (bias == 0).all())

    other_mode = next(mode for mode in CROSS_MODAL_BLOCKS if mode != cross_modal)
    this_block, other_block = CROSS_MODAL_BLOCKS[cross_modal], CROSS_MODAL_BLOCKS[other_mode]
    if initial(this_block) and initial(other_block) is False:
        return (f"{this_block} ({cross_modal}) has its gate LayerNorm at its initial values (weight 1, bias 0) while "
                f"{other_block} ({other_mode}) has trained ones: the checkpoint looks trained in {other_mode} mode; "
                f"convert with --cross-modal {other_mode}, unless you mean to reproduce the authors' own evaluation "
                "(which scores WikiDiverse with the text_to_image block)")
    return None


# ------------------------------------------------------------------------------------------------- processor


def _load_processor(clip: str, config: M3ELConfig) -> tuple[M3ELProcessor | None, str | None]:
    """`(M3ELProcessor, None)` from the tokenizer and image processor that `clip` provides, or `(None, why not)`."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip)
        image_processor = AutoImageProcessor.from_pretrained(clip)
    except (OSError, ValueError, KeyError) as error:
        return None, f"no processor written: {clip} provides no loadable tokenizer and image processor ({error})"
    # transformers builds an empty CLIP tokenizer (special tokens only) when a folder has no tokenizer files;
    # a byte-level BPE vocabulary holds at least the 256 byte tokens.
    why_not = None
    vocab_size = config.clip_config.text_config.vocab_size
    image_size = config.clip_config.vision_config.image_size
    processor = M3ELProcessor(
        image_processor, tokenizer, text_max_length=config.text_max_length, text_separator=config.text_separator
    )
    if len(tokenizer) < 256:
        why_not = f"{clip} holds no tokenizer files (the tokenizer loaded from it has {len(tokenizer)} tokens)"
    elif len(tokenizer) > vocab_size:
        why_not = f"{clip}'s tokenizer has {len(tokenizer)} tokens, but CLIP embeds only {vocab_size}"
    elif processor.image_size != (image_size, image_size):
        why_not = f"{clip}'s image processor makes {processor.image_size} images, CLIP takes {image_size}"
    if why_not:
        return None, f"no processor written: {why_not}"
    return processor, None


# ------------------------------------------------------------------------------------------------- the folder


def _check_output(output: Path, overwrite: bool):
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; pass --overwrite to replace it")


def _verify_folder(folder: Path, processor_written: bool) -> list[str]:
    """The Hub files are all there: config with auto_map, safetensors weights only, the code files."""
    files = sorted(path.name for path in folder.iterdir())
    config = json.loads((folder / "config.json").read_text())
    problems = []
    if "AutoModel" not in config.get("auto_map", {}):
        problems.append("config.json has no auto_map.AutoModel (import modeling_m3el registers it)")
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        problems.append("no model.safetensors")
    if any(name.endswith(".bin") for name in files):
        problems.append("a pickled .bin weights file was written")
    code_files = HUB_CODE_FILES + (("processing_m3el.py",) if processor_written else ())
    problems += [f"{name} was not copied next to the weights" for name in code_files if name not in files]
    if problems:
        raise RuntimeError(f"the converted folder {folder} is incomplete: {'; '.join(problems)}")
    return files


def _move_into_place(built: Path, output: Path):
    """Rename the finished folder to `output`; an existing `output` is set aside first and removed last."""
    old = None
    if output.exists():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)
        else:
            output.rmdir()
    try:
        built.rename(output)
    except OSError:
        if old is not None:
            old.rename(output)
        raise
    if old is not None:
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------------- conversion


def convert_official_checkpoint(
    checkpoint: str | os.PathLike,
    clip: str | os.PathLike,
    cross_modal: str,
    output_dir: str | os.PathLike,
    text_max_length: int = 40,
    overwrite: bool = False,
    unsafe_load: bool = False,
) -> ConversionReport:
    """
    Convert an authors' Lightning checkpoint into a folder that `AutoModel.from_pretrained(output_dir,
    trust_remote_code=True)` loads, and return what was mapped, dropped and checked.

    Args:
        checkpoint: the `.ckpt` file written by the authors' training (`LightningForM3EL`).
        clip: local folder or Hub id of the CLIP it was trained from; only its config (and, when present, its
            tokenizer and image processor) is read, the weights come from the checkpoint.
        cross_modal: `"text_to_image"` (converts `matcher.cmm`) or `"bidirectional"` (converts `matcher.cmmb`).
        output_dir: the folder to write; it must not exist or be empty unless `overwrite`.
        text_max_length: the text length the checkpoint was trained with (40 in every published config).
        unsafe_load: unpickle arbitrary objects (e.g. omegaconf hyper-parameters); only for a file you trust.
    """
    path, clip, output = str(checkpoint), str(clip), Path(os.path.abspath(output_dir))
    if cross_modal not in CROSS_MODAL_MODES:
        raise ValueError(f"cross_modal must be one of {', '.join(CROSS_MODAL_MODES)}, got {cross_modal!r}")
    _check_output(output, overwrite)
    for source in (path, clip):
        if os.path.exists(source) and Path(os.path.abspath(source)).is_relative_to(output):
            raise FileExistsError(f"{output} holds the input {source}; write the conversion elsewhere")

    # 1. Read the checkpoint and cross-check it with its hyper-parameters where they are readable.
    loaded = load_checkpoint(path, unsafe_load=unsafe_load)
    state_dict = _state_dict(loaded, path)
    notes = []
    trained_length = _hyper_parameter(loaded, "data", "text_max_length")
    if isinstance(trained_length, int) and trained_length != text_max_length:
        raise CheckpointConversionError(
            f"{path}: trained with data.text_max_length={trained_length}, converting with {text_max_length}; "
            f"pass --text-max-length {trained_length} (the matching does not mask padding, so the length matters)"
        )
    trained_lambda = _hyper_parameter(loaded, "model", "weight")
    if isinstance(trained_lambda, (int, float)) and float(trained_lambda) != M3ELConfig.csra_lambda:
        raise CheckpointConversionError(
            f"{path}: trained with CSRA lambda (model.weight) {trained_lambda}; M3ELConfig's default is "
            f"{M3ELConfig.csra_lambda} and this converter does not change it"
        )
    kb_folder = _hyper_parameter(loaded, "data", "kb_img_folder")
    if isinstance(kb_folder, str):
        # The authors' code trains the bidirectional block exactly when the KB image folder names WikiDiverse.
        trained_mode = "bidirectional" if "WikiDiverse" in kb_folder else "text_to_image"
        if trained_mode != cross_modal:
            notes.append(
                f"the authors' code trained {CROSS_MODAL_BLOCKS[trained_mode]} for this run (kb_img_folder="
                f"{kb_folder!r}), but {CROSS_MODAL_BLOCKS[cross_modal]} is converted"
                + (
                    "; this reproduces the authors' own evaluation, which scores with the untrained text_to_image "
                    "block"
                    if trained_mode == "bidirectional"
                    else "; its weights are untrained"
                )
            )

    # 2. The configuration: CLIP's architecture from --clip, the matching width and heads from the weights.
    try:
        clip_config = CLIPConfig.from_pretrained(clip)
    except OSError as error:
        raise CheckpointConversionError(f"cannot read a CLIP config from {clip!r}: {error}") from error
    cls_fc = f"{MODULE_MAP['image_embeds_proj']}.weight"
    if cls_fc not in state_dict:
        raise CheckpointConversionError(f"{path}: missing weights the model needs: {cls_fc}")
    matching_dim = state_dict[cls_fc].shape[0]
    head_weights = state_dict.get(f"{CROSS_MODAL_BLOCKS[cross_modal]}.{CSRA_HEAD_WEIGHTS}")
    default_heads = len(M3ELConfig.csra_temperatures)  # a missing head weight is refused in step 3
    num_heads = head_weights.shape[0] if head_weights is not None and head_weights.dim() == 2 else default_heads
    if num_heads not in CSRA_TEMPERATURES_BY_HEADS:
        raise CheckpointConversionError(f"{path}: {num_heads} CSRA heads; the authors' code defines 1 to 8")
    config = M3ELConfig(
        clip_config=clip_config.to_dict(),
        cross_modal=cross_modal,
        matching_dim=matching_dim,
        csra_temperatures=CSRA_TEMPERATURES_BY_HEADS[num_heads],
        text_max_length=text_max_length,
    )
    report = ConversionReport(
        checkpoint=path, output_dir=str(output_dir), cross_modal=cross_modal, matching_dim=matching_dim, notes=notes
    )

    # 3. Map every weight and load strictly: every model key filled exactly once.
    model = M3ELModel(config)
    converted = _convert_state_dict(state_dict, model, cross_modal, path, report)
    dtypes = sorted({str(value.dtype) for value in converted.values() if value.is_floating_point()})
    if dtypes != ["torch.float32"]:
        notes.append(f"checkpoint tensors are {', '.join(dtypes)}; saved as float32")
    model.load_state_dict(converted, strict=True)
    model.eval()
    untrained = _looks_untrained(state_dict, cross_modal)
    if untrained:
        notes.append(untrained)
    processor, why_not = _load_processor(clip, config)
    report.processor_written = processor is not None
    if why_not:
        report.notes.append(why_not)

    # 4. Write into a temporary sibling folder, check it, then rename it into place.
    output.parent.mkdir(parents=True, exist_ok=True)
    building = output.with_name(f".{output.name}.converting-{uuid.uuid4().hex[:8]}")
    building.mkdir()
    try:
        model.save_pretrained(building)
        if processor is not None:
            processor.save_pretrained(building)
        report.files = _verify_folder(building, processor is not None)
        _check_output(output, overwrite)  # again: something may have appeared meanwhile
        _move_into_place(building, output)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return report


# ------------------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_m3el.convert_official_checkpoint",
        description=(
            "Convert a checkpoint of the authors' M3EL code (a PyTorch Lightning .ckpt of LightningForM3EL) into "
            "a Hub-ready folder: config.json with auto_map, model.safetensors, the model code and, when --clip "
            "provides a tokenizer and image processor, an M3ELProcessor. Refuses checkpoints with missing, "
            "misshapen or unknown weights."
        ),
        epilog=(
            "The authors trained text_to_image for WikiMEL and RichpediaMEL and bidirectional for WikiDiverse. "
            "Their own WikiDiverse evaluation scored with the untrained text_to_image block: "
            "convert a WikiDiverse checkpoint with --cross-modal text_to_image to reproduce their logged numbers, "
            "with bidirectional to use the block it trained."
        ),
    )
    parser.add_argument("--checkpoint", required=True, help="the authors' Lightning checkpoint (.ckpt)")
    parser.add_argument(
        "--clip",
        required=True,
        help="local folder or Hub id of the CLIP the checkpoint was trained from (e.g. openai/clip-vit-base-patch32);"
        " its config gives the architecture, the weights come from the checkpoint",
    )
    parser.add_argument(
        "--cross-modal",
        required=True,
        choices=CROSS_MODAL_MODES,
        help="cross-modal block to convert: text_to_image (matcher.cmm) or bidirectional (matcher.cmmb)",
    )
    parser.add_argument("--output", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument(
        "--text-max-length", type=int, default=40, help="text length the checkpoint was trained with (default: 40)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    parser.add_argument(
        "--unsafe-load",
        action="store_true",
        help="load the checkpoint with torch.load(weights_only=False): needed when Lightning pickled the "
        "hyper-parameters as objects (omegaconf), and can run arbitrary code; only for a file you trust",
    )
    args = parser.parse_args(argv)
    if args.text_max_length < 2:
        parser.error(f"--text-max-length must be at least 2, got {args.text_max_length}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = convert_official_checkpoint(
            args.checkpoint,
            args.clip,
            args.cross_modal,
            args.output,
            text_max_length=args.text_max_length,
            overwrite=args.overwrite,
            unsafe_load=args.unsafe_load,
        )
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
