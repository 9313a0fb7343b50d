"""EntityIndex: a KB's entity-side features, precomputed once for a given M3EL model, and exact ranking against it."""

import hashlib
import itertools
import json
import numbers
import os
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .kernels_m3el import FusedKernelError, entities_per_step, fused_g2l_wanted, record_failure
from .kernels_m3el import strict as strict_kernel
from .modeling_m3el import M3ELFeatures, M3ELModel

INDEX_WEIGHTS = "entity_index.safetensors"
INDEX_META = "entity_index.json"
INDEX_FORMAT = 1
# The prefix of the temporary folder `EntityIndex.save` writes into before renaming; one left by a killed save is
# removed by a later save into the same folder once nothing in it has changed for `STALE_SAVE_SECONDS`.
_SAVE_PREFIX = ".entity_index."
STALE_SAVE_SECONDS = 3600
# Config fields that say nothing about the scores, left out of the fingerprint.
_FINGERPRINT_SKIP = {
    "transformers_version", "_name_or_path", "architectures", "auto_map", "custom_pipelines", "dtype", "torch_dtype",
}


def _scoring_config(config: dict) -> dict:
    """The config without the fields that say nothing about the scores, at every level (sub-configs carry a dtype)."""
    return {k: _scoring_config(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _FINGERPRINT_SKIP}


class StaleIndexError(ValueError):
    """The index was built with another model (weights or config) than the one asked to rank with it."""


FINGERPRINT_ROUNDINGS = (torch.bfloat16, torch.float16)


def _fingerprint_snapshot(
    model: M3ELModel, rounding: torch.dtype = torch.bfloat16
) -> tuple[bytes, list[tuple[bytes, object]]]:
    """
    What `model_fingerprint` hashes, copied to host memory: the config's JSON and, by name, each weight's bytes
    (floating-point weights rounded to `rounding`). The floating-point weights are rounded and joined on their own
    device and copied to the host in one transfer (not one synchronising copy per tensor).
    """
    if rounding not in FINGERPRINT_ROUNDINGS:
        raise ValueError(f"a fingerprint rounds weights to one of {FINGERPRINT_ROUNDINGS}, got {rounding}")
    model = _unwrapped(model)
    config = json.dumps(_scoring_config(model.config.to_dict()), sort_keys=True, default=str).encode()
    named = sorted(model.state_dict().items())
    floating = [t.detach() for _, t in named if t.is_floating_point()]
    device = floating[0].device if floating else "cpu"
    flat = torch.empty(sum(t.numel() for t in floating), dtype=rounding, device=device)
    offset = 0
    for tensor in floating:  # rounded as they are copied in (round to nearest even, as `.to`)
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1))
        offset += tensor.numel()
    flat = flat.view(torch.int16).cpu().numpy()
    parts, offset = [], 0
    for name, tensor in named:
        if tensor.is_floating_point():
            data = flat[offset : offset + tensor.numel()]  # a view: hashed in place
            offset += tensor.numel()
        else:
            data = tensor.detach().cpu().contiguous().numpy()
        parts.append((name.encode(), data))
    return config, parts


def _hash_snapshot(snapshot: tuple[bytes, list[tuple[bytes, object]]]) -> str:
    config, parts = snapshot
    digest = hashlib.blake2b(digest_size=16)
    digest.update(config)
    for name, data in parts:
        digest.update(name)
        digest.update(data)  # numpy arrays hash by their buffer, without a copy (and without the GIL)
    return digest.hexdigest()


def model_fingerprint(model: M3ELModel, rounding: torch.dtype = torch.bfloat16) -> str:
    """
    Hash of the model's config and weights, the weights rounded to `rounding` (bfloat16 or float16) first: the same
    checkpoint loaded in float32 or in that dtype has one fingerprint, while any training step changes it. An index
    keeps both (`EntityIndex.fingerprint`, `EntityIndex.float16_fingerprint`): a weight rounded to float16 and then
    to bfloat16 may differ from the weight rounded to bfloat16 at once, so no single rounding serves all three dtypes.
    """
    return _hash_snapshot(_fingerprint_snapshot(model, rounding))


def _floating_dtypes(model: M3ELModel) -> set[torch.dtype]:
    return {t.dtype for t in model.state_dict().values() if t.is_floating_point()}


def _matches(model: M3ELModel, fingerprint: str, float16_fingerprint: str | None) -> tuple[bool, str]:
    """
    Whether `model` is the one the fingerprints were taken of, up to the rounding of loading it in float32, bfloat16
    or float16: the fingerprint of the model's own precision first (float16 for a model with float16 weights), the
    other when that one differs. -> (match, the model's first fingerprint, for the error message).
    """
    orders = [(fingerprint, torch.bfloat16), (float16_fingerprint, torch.float16)]
    if torch.float16 in _floating_dtypes(model):
        orders.reverse()
    first = None
    for expected, rounding in orders:
        if expected is None:
            continue
        current = model_fingerprint(model, rounding)
        first = first or current
        if current == expected:
            return True, current
    return False, first


# Steps taken by fused optimizers, by parameter: their kernels write the weights without bumping the version counters
# (`_model_state`), so a hook counts their steps (registered with the first `_model_state`).
_fused_steps = None


def _fused_step_counts():
    global _fused_steps
    if _fused_steps is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        from torch.utils.weak import WeakIdKeyDictionary

        _fused_steps = WeakIdKeyDictionary()  # (tensors as keys by identity: their `==` is elementwise)

        def count(optimizer, args, kwargs) -> None:
            for group in optimizer.param_groups:
                if group.get("fused"):
                    for parameter in group["params"]:
                        _fused_steps[parameter] = _fused_steps.get(parameter, 0) + 1

        register_optimizer_step_post_hook(count)
    return _fused_steps


def _config_fields(config, seen: frozenset = frozenset()) -> tuple:
    """The config's own fields, and its sub-configs' (`clip_config`, its `text_config` ...), as (name, repr) pairs."""
    from transformers import PretrainedConfig

    seen = seen | {id(config)}
    fields = []
    for name, value in sorted(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            value = _config_fields(value, seen) if id(value) not in seen else "(a config above)"
        else:
            value = repr(value)
        fields.append((name, value))
    return tuple(fields)


def _model_state(model: M3ELModel) -> tuple:
    """
    What a change to the model's weights or config changes, read without touching the weights: each parameter's and
    buffer's storage, dtype and version counter (which in-place writes to it bump: `load_state_dict`, `nn.init`, the
    optimizers' steps), the steps fused optimizers took on it (their kernels leave the version counter as it is), and
    the fields of the config and its sub-configs. Host-side attributes only (no device synchronisation): about 0.6 ms
    at B/32 size on this CPU (1 ms in a process where a fused optimizer has stepped), against 0.5 to 1 s to hash
    the weights. Unseen: writes through `.data` (a tensor with a version counter of its own), through a numpy view of
    a weight, and in `torch.inference_mode` (whose tensors keep no version counter); after those, call `check_model`.
    """
    fused = _fused_step_counts()
    fused = fused if len(fused) else None
    model = _unwrapped(model)
    tensors = []
    for module in model.modules():  # (one walk over the modules: `parameters()` and `buffers()` would take two)
        for tensor in itertools.chain(module._parameters.values(), module._buffers.values()):
            if tensor is None:
                continue
            try:
                version = tensor._version
            except RuntimeError:  # an inference tensor
                version = None
            tensors.append((tensor.data_ptr(), tensor.dtype, version, fused.get(tensor, 0) if fused else 0))
    return tuple(tensors), _config_fields(model.config)


def _unwrapped(model: M3ELModel) -> M3ELModel:
    """The model itself, out of `torch.compile`'s wrapper (whose weights' names start with `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def _stale_message(model: M3ELModel, fingerprint: str, float16_fingerprint: str | None, current: str) -> str:
    why = f"fingerprint {fingerprint}, this model: {current}"
    half = _floating_dtypes(model) & {torch.float16, torch.bfloat16}
    if float16_fingerprint is None and torch.float16 in half:
        why += ("; the index was saved before indexes kept a float16 fingerprint, so a model loaded in float16 cannot "
                "be checked against it: load the model in float32 or bfloat16, or rebuild the index")
    elif half:
        why += ("; if it is the same checkpoint: an index built from (or saved with) the model in one half precision "
                "is refused by the model in the other, their roundings differ; build indexes from the float32 model")
    return f"was built with another model ({why}); rebuild it with EntityIndex.build(model, processor, entities)"


class _BackgroundFingerprint:
    """The model's fingerprints (bfloat16, float16 roundings), its weights copied now and hashed in a thread while the
    caller encodes a KB (the hashes, about half a second each at B/32 size, run beside the GPU's work); `result()`
    waits for them."""

    def __init__(self, model: M3ELModel):
        from concurrent.futures import ThreadPoolExecutor

        self.model, self.model_state = model, _model_state(model)  # the state whose weights are hashed
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m3el-fingerprint")
        self._futures = [self._executor.submit(_hash_snapshot, _fingerprint_snapshot(model, rounding))
                         for rounding in FINGERPRINT_ROUNDINGS]
        self._executor.shutdown(wait=False)

    def result(self) -> dict[str, str]:
        """The `fingerprint` and `float16_fingerprint` arguments of `EntityIndex`."""
        bfloat16, float16 = (future.result() for future in self._futures)
        return {"fingerprint": bfloat16, "float16_fingerprint": float16}

    def verified(self, index: "EntityIndex") -> "EntityIndex":
        """`index` (built with these fingerprints), knowing the model as it was when its weights were copied: ranking
        with the model unchanged since then does not hash it again (`EntityIndex._check_use`)."""
        index._verified[self.model] = self.model_state
        self.model = None
        return index


def _new_content_id() -> str:
    return uuid.uuid4().hex


def _legacy_content_id(meta: dict) -> str:
    """The content id of an index saved before indexes kept one, and before they kept a `save_id`: derived from what
    its files hold (the model's fingerprint and the entity ids), the same at every load of those files."""
    digest = hashlib.blake2b(json.dumps([meta["fingerprint"], meta["entity_ids"]]).encode(), digest_size=16)
    return "legacy-" + digest.hexdigest()


def _shared_content_id(accelerator) -> str:
    """A new content id, the same in every process of `accelerator` (the one process 0 drew): a collective call."""
    mine = torch.tensor(list(uuid.uuid4().bytes), dtype=torch.int64, device=accelerator.device)
    return bytes(accelerator.gather(mine)[:16].cpu().tolist()).hex()


def _refuse_float16_overflow(name: str, tensor: torch.Tensor, entity_ids: Sequence[str]) -> None:
    """A ValueError naming the tensor and its entities when a float16 index tensor holds an infinite value (a value
    beyond float16's 65504 before the cast). Looked for a few thousand rows at a time: no mask of the whole index."""
    rows, values = [], 0
    for start in range(0, tensor.shape[0], 4096):
        infinite = torch.isinf(tensor[start : start + 4096]).reshape(min(4096, tensor.shape[0] - start), -1)
        if bool(infinite.any()):
            values += int(infinite.sum())
            rows += (infinite.any(1).nonzero().flatten() + start).tolist()
    if rows:
        raise ValueError(
            f"index tensor {name} holds {values} infinite value(s) in float16, in {len(rows)} of {len(entity_ids)} "
            f"entities (the first: {[entity_ids[row] for row in rows[:5]]}): float16 ends at "
            f"{torch.finfo(torch.float16).max:g}, so a larger value does not survive the cast; keep this index in "
            "bfloat16 or float32"
        )


class _Rows:
    """
    An index's tensors being built batch by batch: allocated once, at their full `total` rows, when the first batch
    arrives (in `dtype`, default each tensor's own, on `device`, default the batch's), then filled in place, so that
    building never holds the batches and their concatenation at once (twice the index).
    """

    def __init__(self, total: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        self.total, self.dtype, self.device = total, dtype, device
        self.tensors: dict[str, torch.Tensor] = {}
        self.filled = 0

    def add(self, model: M3ELModel, features: M3ELFeatures) -> None:
        """`model.prepare_entities(features)`, flattened to `"{branch}.{name}"`, into the next rows."""
        count = None
        for branch, part in model.prepare_entities(features).items():
            for name, tensor in part.items():
                key = f"{branch}.{name}"
                if key not in self.tensors:
                    self.tensors[key] = torch.empty((self.total, *tensor.shape[1:]), dtype=self.dtype or tensor.dtype,
                                                    device=self.device or tensor.device)
                count = tensor.shape[0]
                self.tensors[key][self.filled : self.filled + count].copy_(tensor)
        self.filled += count or 0

    def result(self) -> dict[str, torch.Tensor]:
        if self.filled != self.total:
            raise RuntimeError(f"{self.filled} of {self.total} entities were encoded")
        return self.tensors


def share_bar(description: str, unit: str, total: int, world: int = 1):
    """A progress bar of `total` units (the unit speeds are quoted in); with several processes, shown by the first
    for its own share, which the label says."""
    from tqdm.auto import tqdm

    share_note = f" (process 1 of {world}: its share)" if world > 1 else ""
    return tqdm(desc=description + share_note, unit=unit, total=total)


def _entity_bar(total: int, world: int = 1):
    """The progress bar of an index build, in entities, the unit of encoding speeds."""
    return share_bar("Indexing entities", "entity", total, world)


def gather_shares(accelerator, tensor: torch.Tensor, share: int, total: int) -> torch.Tensor:
    """
    Every process holds rows [rank * share, (rank + 1) * share) of `total` rows (the last shares may be short or
    empty): pad each to `share` rows, gather in rank order, cut the padding back out. Padding only ever trails.
    """
    padded = torch.zeros((share, *tensor.shape[1:]), dtype=tensor.dtype, device=accelerator.device)
    padded[: tensor.shape[0]] = tensor.to(accelerator.device)
    return accelerator.gather(padded)[:total]


class EntityIndex:
    """
    Everything M3EL's score needs from the entities of a KB, and nothing more: the outputs of
    `M3ELModel.prepare_entities` (LayerNormed global vectors, G2L queries and global projections, cross-modal
    vectors), so ranking never re-runs CLIP or the entity half of the matching network.

    Build with `EntityIndex.build(model, processor, entities)` (or `from_features`), save with `save(folder)`,
    load with `EntityIndex.load(folder, model)` (refused when `model` is not the one it was built with), and rank
    with `scores`, `rank`, `topk` or `score_candidates`. Those calls refuse a model the index was not built with too,
    without hashing its weights again (0.5 to 1 s at B/32 size) while the model is one already checked and unchanged
    since: a step of an optimizer over its weights, `load_state_dict` or a dtype cast is seen, and costs one hash (after
    training, rebuild the index); a write through `.data` or a numpy view is not seen (call `check_model` after one).

    Two identifiers: `content_id` names the encoding (which entity tensors these are), `save_id` the save (which
    write of the files). An encoding (`build`, `from_inputs`, `from_features`), a subset or a union (`select`,
    `concat`) or the constructor without `content_id` makes a new content id; `save`/`load` and `to` (a move or a
    dtype cast of the same encoding) keep it, and so does the constructor given it (e.g. to stamp other fingerprints
    on the same tensors). Every `save` makes a new save id. What was built on an index's content (a
    `TwoStageRetriever`) checks `content_id`, so it survives re-saves; the files' consistency (`load`) checks both.
    """

    # How the pruned `rank` and `topk` score their undecided pairs through the fused kernel (CUDA): "candidates",
    # each mention's list of needed entities (a program step covers 2-6 of that mention's needed entities: no step
    # for pairs not needed), or "grid", the kernel's (mention, entity) grid with a mask of the pairs needed (a step
    # covers 2-6 consecutive entities and runs when any of them is needed). Counted on random B/32 weights, the
    # candidates kernel runs 2-3 times fewer steps (benchmarks/README.md, "Program steps"), and on an H200 at
    # 109,976 random B/32 entities it ranked 1,062 mentions/s in float32 where the grid ranked 478 (1,634 and 1,162
    # with a bfloat16 index; benchmarks/README.md, "GPU", 2026-11-28). Same results either way.
    pruned_scoring = "candidates"
    # Whether the pruned `rank` and `topk` narrow the bounds of their undecided pairs by computing one G2L block's
    # part exactly first (the block with the widest interval per unit of work), before scoring in full the pairs
    # still undecided. Same results either way; off only to measure what it saves.
    refine_bounds = True
    # On the CPU, the PyTorch scoring path works in pieces of at most this many bytes, whatever `memory_budget_bytes`
    # allows (see `_piece_bytes`).
    cpu_piece_bytes = 16 * 2**20

    def __init__(
        self, tensors: dict[str, torch.Tensor], entity_ids: Sequence[str], fingerprint: str,
        float16_fingerprint: str | None = None, save_id: str | None = None, content_id: str | None = None,
    ):
        """
        `content_id`: which encoding `tensors` are (see the class's docstring); None: a new one. Pass an index's
        `content_id` only with its tensors (or a move or cast of them). The tensors of an index are not to be changed
        in place: new values are a new index (a new content id).
        """
        entity_ids = [str(entity_id) for entity_id in entity_ids]  # ids are strings, however given (ints, numpy ints)
        if len(entity_ids) == 0:
            raise ValueError("an EntityIndex needs at least one entity")
        if len(set(entity_ids)) != len(entity_ids):
            seen, duplicates = set(), []
            for entity_id in entity_ids:
                if entity_id in seen:
                    duplicates.append(entity_id)
                seen.add(entity_id)
            raise ValueError(f"duplicate entity ids in the index: {duplicates[:5]}")
        for name, tensor in tensors.items():
            if tensor.shape[0] != len(entity_ids):
                raise ValueError(f"index tensor {name} has {tensor.shape[0]} rows for {len(entity_ids)} entities")
            if tensor.dtype == torch.float16:  # float16 ends at 65504: a larger value became infinite when cast
                _refuse_float16_overflow(name, tensor, entity_ids)
        self.tensors = tensors
        self.entity_ids = entity_ids
        self.fingerprint = fingerprint  # `model_fingerprint(model)`: weights rounded to bfloat16
        self.float16_fingerprint = float16_fingerprint  # the same, rounded to float16 (None: an index saved without)
        # The identifier `save` stamps both files with (and `load` reads back): which saved index this is. None for an
        # index not saved or loaded yet (or derived by `select` or `concat`), or loaded from a folder saved without.
        self.save_id = save_id
        # Which encoding these tensors are: kept by `save`/`load` and `to`, new for new tensors (see the class).
        self.content_id = content_id if content_id is not None else _new_content_id()
        self._position = {entity_id: i for i, entity_id in enumerate(self.entity_ids)}
        # The models last found to be the one the index was built with, each with its `_model_state` then: scoring
        # with one of them, unchanged since, needs no new hash (`_check_known_model`). Shared with the indexes of the
        # same fingerprints made from this one (`to`, `select`); held weakly.
        self._verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self.entity_ids)

    def __getstate__(self) -> dict:  # (a pickle or a copy knows no model yet: the first scoring call checks it)
        return {key: value for key, value in self.__dict__.items() if key != "_verified"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._verified = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"EntityIndex({len(self)} entities, {self.nbytes / 2**20:.1f} MiB, {self.dtype}, {self.device})"

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device=None, dtype=None) -> "EntityIndex":
        """
        This index on `device` in `dtype`. A move or a cast keeps `content_id`: the cast tensors are the same
        encoding up to rounding, so what was built on it (a retriever's stage-1 vectors, an approximation whose
        candidates are re-scored exactly on the index given) still serves; a new encoding gets a new content id.
        """
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        moved = EntityIndex(tensors, self.entity_ids, self.fingerprint, self.float16_fingerprint, self.save_id,
                            self.content_id)
        moved._verified = self._verified  # the same fingerprints: the same models pass (one record for both)
        return moved

    def positions(self, entity_ids: Iterable[str]) -> torch.Tensor:
        """Row of each entity id (ids are strings: an int is looked up as `str(id)`); an unknown id raises a KeyError
        naming it."""
        rows = []
        for entity_id in entity_ids:
            key = str(entity_id)
            if key not in self._position:
                raise KeyError(f"entity id {key!r} is not in the index")
            rows.append(self._position[key])
        return torch.tensor(rows, dtype=torch.long)

    def select(self, entity_ids: Iterable[str]) -> "EntityIndex":
        """
        An index of these entities alone, in this order (their rows copied), for the same model: e.g. a KB without
        its retired entities. An unknown id raises a KeyError naming it; a repeated id, or none at all, a ValueError.
        A new content id, unless it selects every entity in the index's order (the same tensors, copied).
        """
        rows = self.positions(entity_ids)
        whole = torch.equal(rows, torch.arange(len(self)))
        rows = rows.to(self.device)
        tensors = {name: tensor.index_select(0, rows) for name, tensor in self.tensors.items()}
        selected = EntityIndex(tensors, [self.entity_ids[row] for row in rows.tolist()], self.fingerprint,
                               self.float16_fingerprint, content_id=self.content_id if whole else None)
        selected._verified = self._verified
        return selected

    @classmethod
    def concat(cls, indexes: Sequence["EntityIndex"]) -> "EntityIndex":
        """
        One index of the entities of several, in order: e.g. a KB's index and one built for its new entities with
        the same model, so that only the new entities are encoded. They must come from the same model (else
        `StaleIndexError`) and have the same dtype and device (`to`); an id in two of them raises a ValueError.
        A new content id (the content id of a single index given).
        """
        indexes = list(indexes)
        if not indexes:
            raise ValueError("concat needs at least one EntityIndex")
        first = indexes[0]
        for position, index in enumerate(indexes[1:], start=1):
            if index.fingerprint != first.fingerprint:
                raise StaleIndexError(
                    f"index {position} of concat was built with another model than index 0 (fingerprint "
                    f"{index.fingerprint}, index 0: {first.fingerprint}); rebuild it with index 0's model"
                )
            if (index.dtype, index.device) != (first.dtype, first.device):
                raise ValueError(
                    f"index {position} of concat is {index.dtype} on {index.device}, index 0 {first.dtype} on "
                    f"{first.device}: bring them to one with EntityIndex.to(device=..., dtype=...)"
                )
            if index.tensors.keys() != first.tensors.keys():  # (the same model makes the same tensors)
                raise ValueError(f"index {position} of concat holds other tensors than index 0: "
                                 f"{sorted(index.tensors)} against {sorted(first.tensors)}")
        tensors = {name: torch.cat([index.tensors[name] for index in indexes]) for name in first.tensors}
        float16 = {index.float16_fingerprint for index in indexes}
        joined = cls(tensors, [entity_id for index in indexes for entity_id in index.entity_ids], first.fingerprint,
                     float16.pop() if len(float16) == 1 else None,
                     content_id=first.content_id if len(indexes) == 1 else None)
        if joined.float16_fingerprint == first.float16_fingerprint:  # (all have its bfloat16 fingerprint)
            joined._verified = first._verified
        return joined

    # ------------------------------------------------------------------------------------------------ build

    @classmethod
    @torch.no_grad()
    def from_features(
        cls,
        model: M3ELModel,
        features: M3ELFeatures,
        entity_ids: Sequence[str],
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> "EntityIndex":
        """
        Index entity features made by `model.encode`: all at once, or `batch_size` entities at a time (each batch
        moved to the model's device: features may stay on the host). Kept in `dtype` on `device` (defaults: the
        dtype and device the model's outputs have).
        """
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        num_entities = features.text_embeds.shape[0]
        step = batch_size or max(num_entities, 1)
        fingerprint = _BackgroundFingerprint(model)
        rows = _Rows(num_entities, dtype, device)
        for start in range(0, num_entities, step):
            rows.add(model, M3ELFeatures(**{k: v[start : start + step].to(model.device) for k, v in features.items()}))
        return fingerprint.verified(cls(rows.result(), entity_ids, **fingerprint.result()))

    @classmethod
    @torch.no_grad()
    def from_inputs(
        cls,
        model: M3ELModel,
        inputs: Mapping[str, torch.Tensor],
        entity_ids: Sequence[str],
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> "EntityIndex":
        """
        Index a KB already preprocessed into tensors: `input_ids` (E, L), `pixel_values` (E, 3, H, W) and optionally
        `attention_mask`, as `processor.process_entities` returns them (on any device; each batch is moved to the
        model's). Encoded `batch_size` entities at a time; kept in `dtype` on `device` (defaults: the model's).
        """
        if len(entity_ids) == 0:
            raise ValueError("cannot build an index of an empty KB")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values")}
        for name, tensor in inputs.items():
            if tensor.shape[0] != len(entity_ids):
                raise ValueError(f"inputs[{name!r}] holds {tensor.shape[0]} entities, entity_ids {len(entity_ids)}")
        model_device = model.device
        fingerprint = _BackgroundFingerprint(model)
        rows = _Rows(len(entity_ids), dtype, device)
        bar = _entity_bar(len(entity_ids)) if progress else None
        for start in range(0, len(entity_ids), batch_size):
            batch = {k: v[start : start + batch_size].to(model_device, non_blocking=True) for k, v in inputs.items()}
            rows.add(model, model.encode(**batch, side="entity"))
            if bar is not None:
                bar.update(min(batch_size, len(entity_ids) - start))
        if bar is not None:
            bar.close()
        return fingerprint.verified(cls(rows.result(), entity_ids, **fingerprint.result()))

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: M3ELModel,
        processor,
        entities: Sequence[dict],
        batch_size: int = 256,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
        accelerator=None,
        num_workers: int = 0,
    ) -> "EntityIndex":
        """
        Encode a KB in batches. `entities`: dicts with `id`, `name`, `description` and `image` (a path, PIL image,
        bytes or None; the first image of an entity, as in evaluation). The index is kept in `dtype`
        (default: the model's) on `device` (default: the model's). `num_workers` threads read and resize the images
        of the next batches while the model encodes the current one (`M3ELProcessor.prefetched`): from image files
        with the model on a GPU, reading them is most of the work.

        With an Accelerate `accelerator` of several processes, each process encodes a contiguous share of the KB
        and every process receives the whole index.
        """
        if len(entities) == 0:
            raise ValueError("cannot build an index of an empty KB")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        model_device = model.device
        device = torch.device(device) if device is not None else model_device
        rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
        fingerprint = _BackgroundFingerprint(model)
        share = -(-len(entities) // world)
        local = entities[rank * share : (rank + 1) * share]
        # on `device` at once in one process; on the model's, to be gathered, in several
        rows = _Rows(len(local), dtype, device if world == 1 else model_device)
        chunks = [local[start : start + batch_size] for start in range(0, len(local), batch_size)]
        batches = processor.prefetched("entity", (
            ([e["name"] for e in chunk], [e["description"] for e in chunk], [e.get("image") for e in chunk],
             [f"entity {e['id']!r} image {e.get('image')!r}" for e in chunk])
            for chunk in chunks
        ), num_workers)
        bar = _entity_bar(len(local), world) if progress and rank == 0 else None
        for chunk, inputs in zip(chunks, batches):
            rows.add(model, model.encode(**inputs.to(model_device), side="entity"))
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if local:
            tensors = rows.result()
        else:  # this process's share is empty (more processes than entities): shapes from one entity
            probe = cls.build(model, processor, entities[:1], batch_size=1, dtype=dtype, progress=False)
            tensors = {name: tensor[:0].to(model_device) for name, tensor in probe.tensors.items()}
        if world > 1:
            tensors = {name: gather_shares(accelerator, t, share, len(entities)) for name, t in tensors.items()}
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        # a new encoding: a new content id, one for all processes (each holds the whole index)
        content_id = _shared_content_id(accelerator) if world > 1 else None
        return fingerprint.verified(
            cls(tensors, [e["id"] for e in entities], **fingerprint.result(), content_id=content_id)
        )

    # --------------------------------------------------------------------------------------------- save/load

    def save(self, folder: str | os.PathLike) -> None:
        """
        Write `entity_index.safetensors` and `entity_index.json` into `folder`, atomically (temp, then rename). Both are
        stamped with a new identifier, `save_id` (set on this index too), which `load` compares: a crash between the
        two renames leaves a pair that is refused, never new weights read with old ids. Both also hold the index's
        `content_id` (unchanged by saving). A temporary folder left by a save that was killed is removed once untouched
        for `STALE_SAVE_SECONDS`.
        """
        os.makedirs(folder, exist_ok=True)
        _remove_stale_saves(folder)
        save_id = uuid.uuid4().hex
        meta = {
            "format": INDEX_FORMAT,
            "fingerprint": self.fingerprint,
            "float16_fingerprint": self.float16_fingerprint,
            "save_id": save_id,
            "content_id": self.content_id,
            "num_entities": len(self),
            "dtype": str(self.dtype).replace("torch.", ""),
            "entity_ids": self.entity_ids,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        with tempfile.TemporaryDirectory(dir=folder, prefix=_SAVE_PREFIX) as tmp:
            save_file(tensors, os.path.join(tmp, INDEX_WEIGHTS),
                      metadata={"fingerprint": self.fingerprint, "save_id": save_id, "content_id": self.content_id})
            with open(os.path.join(tmp, INDEX_META), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            # Weights first, metadata last: a crash between the two leaves a save_id mismatch, never a silent mix.
            os.replace(os.path.join(tmp, INDEX_WEIGHTS), os.path.join(folder, INDEX_WEIGHTS))
            os.replace(os.path.join(tmp, INDEX_META), os.path.join(folder, INDEX_META))
        self.save_id = save_id

    @classmethod
    def load(
        cls, folder: str | os.PathLike, model: M3ELModel | None = None, device=None, dtype=None
    ) -> "EntityIndex":
        """
        Load an index saved with `save`, onto `device` (default: the model's, as `build` makes it; without a model, the
        CPU) in `dtype` (default: as saved). With `model`, refuse (StaleIndexError) an index built with another model.
        A missing folder or file raises FileNotFoundError; files of two different saves, or a damaged file, ValueError.
        The index keeps the saved `content_id` (files saved before it was kept: their `save_id`, or for files without
        one either, an id derived from their fingerprint and entity ids).
        """
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"no entity index at {folder}: no such folder")
        meta_path, weights_path = os.path.join(folder, INDEX_META), os.path.join(folder, INDEX_WEIGHTS)
        for path in (meta_path, weights_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no entity index in {folder}: {os.path.basename(path)} is missing")
        with open(meta_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{meta_path}: not valid JSON ({error})") from None
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path}: index format {found!r}, this code reads {INDEX_FORMAT}")
        for key in ("fingerprint", "entity_ids"):
            if key not in meta:
                raise ValueError(f"{meta_path}: no {key!r}; not an entity index this code wrote")
        if device is None:
            device = model.device if model is not None else "cpu"
        # One open handle for the stamp and the tensors: a save renaming new files into place meanwhile cannot hand
        # this load new weights under the metadata just checked (the open file stays the one whose stamp was read).
        try:
            with safe_open(weights_path, framework="pt", device=str(device)) as f:
                stamp = f.metadata() or {}
                # The save's identifier where both files have one (a pair saved before it was kept: the fingerprint),
                # and the content id (None in both files saved before it was kept)
                if (stamp.get("fingerprint"), stamp.get("save_id"), stamp.get("content_id")) != (
                    meta["fingerprint"], meta.get("save_id"), meta.get("content_id")
                ):
                    raise ValueError(f"{folder}: {INDEX_WEIGHTS} and {INDEX_META} come from different builds "
                                     "(interrupted or concurrent save?); rebuild, or load again")
                float16_fingerprint = meta.get("float16_fingerprint")  # absent from indexes saved before it was kept
                if model is not None:
                    state = _model_state(model)
                    match, current = _matches(model, meta["fingerprint"], float16_fingerprint)
                    if not match:
                        why = _stale_message(model, meta["fingerprint"], float16_fingerprint, current)
                        raise StaleIndexError(f"the entity index in {folder} {why}")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle)
        except SafetensorError as error:  # a truncated or damaged file
            raise ValueError(f"{weights_path}: cannot be read ({_one_line(error)}); rebuild the index") from None
        if dtype is not None:
            for name in list(tensors):  # one tensor at a time: each saved tensor is freed once converted
                tensors[name] = tensors[name].to(dtype)
        content_id = meta.get("content_id") or meta.get("save_id") or _legacy_content_id(meta)
        index = cls(tensors, meta["entity_ids"], meta["fingerprint"], float16_fingerprint, meta.get("save_id"),
                    content_id)
        if model is not None:
            index._verified[model] = state
        return index

    # -------------------------------------------------------------------------------------------------- rank

    def _prepared(self, start: int, stop: int) -> dict[str, dict[str, torch.Tensor]]:
        prepared: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            branch, name = key.split(".", 1)
            prepared.setdefault(branch, {})[name] = tensor[start:stop]
        return prepared

    def check_model(self, model: M3ELModel) -> None:
        """Refuse (StaleIndexError) a model other than the one the index was built with, in float32, bfloat16 or
        float16. Hashes the model's weights (0.5 to 1 s at B/32 size)."""
        state = _model_state(model)
        match, current = _matches(model, self.fingerprint, self.float16_fingerprint)
        if not match:
            raise StaleIndexError(
                "this entity index " + _stale_message(model, self.fingerprint, self.float16_fingerprint, current)
            )
        self._verified[model] = state

    def _check_use(self, model: M3ELModel) -> None:
        """What scoring checks of `model`: that it is on the index's device, and `_check_known_model`."""
        self._check_device(model)
        self._check_known_model(model)

    def _check_known_model(self, model: M3ELModel) -> None:
        """
        `check_model`, hashing the model's weights only when they, or its config, may have changed since this index
        last found it to be the model it was built with (`_model_state`): an index from `build` or
        `load(folder, model)` used with that model as it is costs no hash; a model trained a step, or cast to another
        dtype, since costs one.
        """
        if self._verified.get(model) == _model_state(model):
            return
        self.check_model(model)

    @torch.no_grad()
    def scores(
        self, model: M3ELModel, mention_features: M3ELFeatures, chunk_size: int | None = None,
        memory_budget_bytes: int = 2**30,
    ) -> torch.Tensor:
        """
        Exact final scores (B, E) of mentions against every entity. Entities are taken `chunk_size` at a time
        (default: as many as fit `memory_budget_bytes` of attention scores), so no (mention x entity x token x
        token) tensor for the whole KB ever exists. A model other than the one the index was built with (another
        checkpoint, or this one changed since) is refused (StaleIndexError), as by `rank`, `topk` and
        `score_candidates`.
        """
        mentions, num_mentions = self._prepared_mentions(model, mention_features)
        if chunk_size is None:
            chunk_size = self.chunk_size_for(num_mentions, self._piece_bytes(memory_budget_bytes))
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        # One output, allocated once and filled chunk by chunk: gathering the chunks' results and joining them would
        # hold both (and, on the CPU, leave the allocator holding thousands of freed pieces).
        scores = None
        for start in range(0, len(self), chunk_size):
            piece = model.score_prepared(mentions, self._prepared(start, start + chunk_size)).logits
            if scores is None:
                scores = piece.new_empty((piece.shape[0], len(self)))
            scores[:, start : start + piece.shape[1]] = piece
        return scores

    def _piece_bytes(self, memory_budget_bytes: int) -> int:
        """
        The budget of one piece of the PyTorch scoring path (attention scores, gathered rows): `memory_budget_bytes`,
        on the CPU at most `cpu_piece_bytes`. There, larger pieces do not save time but lose it: each fresh
        allocation of hundreds of MiB is paged in anew and leaves the caches (B/32 widths, 20,000 entities, one
        thread: `rank` 3.1 s in pieces of up to 1 GiB, half of it in page faults, 1.5 s in pieces of 16 MiB;
        at 4,000 entities `scores`, `score_candidates` and `topk` 1.4-2.3x faster too). On a GPU the budget is used
        whole: fewer, larger launches.
        """
        if self.device.type == "cpu":
            return min(memory_budget_bytes, self.cpu_piece_bytes)
        return memory_budget_bytes

    def chunk_size_for(self, num_mentions: int, memory_budget_bytes: int) -> int:
        """Entities per chunk so that the attention scores of a chunk (and their softmax) fit the budget."""
        tokens = [self.tensors[k].shape[1] ** 2 for k in ("text.query", "image.query") if k in self.tensors]
        per_entity = 3 * max(tokens, default=1) * num_mentions * 4  # scores, softmax and a float32 copy
        return max(1, min(len(self), memory_budget_bytes // max(per_entity, 1)))

    @torch.no_grad()
    def score_candidates(
        self,
        model: M3ELModel,
        mention_features: M3ELFeatures,
        candidate_rows: torch.Tensor,
        memory_budget_bytes: int = 2**30,
    ) -> torch.Tensor:
        """
        Exact final scores (B, K) of each mention against its own K candidates, `candidate_rows` (B, K): rows of this
        index. Entry [b, k] equals `scores(...)[b, candidate_rows[b, k]]`. The candidates' tensors are gathered a
        group of mentions at a time, so that gathered tensors and attention scores fit `memory_budget_bytes`.
        """
        num_mentions = mention_features.text_embeds.shape[0]
        if num_mentions == 0:
            raise ValueError("no mentions to score (a batch of 0)")
        mentions = model.prepare_mentions(mention_features)
        return self.score_prepared_candidates(model, mentions, candidate_rows, memory_budget_bytes)

    @torch.no_grad()
    def score_prepared_candidates(
        self, model: M3ELModel, mentions: dict, candidate_rows: torch.Tensor, memory_budget_bytes: int = 2**30
    ) -> torch.Tensor:
        """`score_candidates` from mentions already prepared with `model.prepare_mentions`."""
        self._check_use(model)
        return self._score_prepared_candidates(model, mentions, candidate_rows, memory_budget_bytes)

    def _score_prepared_candidates(
        self, model: M3ELModel, mentions: dict, candidate_rows: torch.Tensor, memory_budget_bytes: int
    ) -> torch.Tensor:
        """`score_prepared_candidates` for a model already checked (`_check_use`)."""
        num_mentions = next(iter(next(iter(mentions.values())).values())).shape[0]
        if not isinstance(candidate_rows, torch.Tensor) or candidate_rows.dtype != torch.long:
            raise TypeError("candidate_rows must be a torch.LongTensor of shape (num_mentions, K)")
        if candidate_rows.dim() != 2 or candidate_rows.shape[0] != num_mentions or candidate_rows.shape[1] == 0:
            raise ValueError(
                f"candidate_rows must have shape ({num_mentions}, K) with K >= 1, got {tuple(candidate_rows.shape)}"
            )
        candidate_rows = candidate_rows.to(self.device)
        if candidate_rows.min() < 0 or candidate_rows.max() >= len(self):
            raise IndexError(
                f"candidate rows must lie in [0, {len(self)}), got [{candidate_rows.min()}, {candidate_rows.max()}]"
            )
        mentions = self._on_index(mentions)
        num_candidates = candidate_rows.shape[1]
        if self._fused():  # the candidates kernel reads each listed entity's rows from the index: nothing gathered
            try:
                with strict_kernel():
                    return self._score_listed(model, mentions, candidate_rows, memory_budget_bytes)
            except FusedKernelError as error:
                record_failure(error)
        per_candidate = self._bytes_per_candidate()
        memory_budget_bytes = self._piece_bytes(memory_budget_bytes)
        # Candidates in slices only when one mention's candidates alone exceed the budget.
        slice_size = max(1, min(num_candidates, memory_budget_bytes // per_candidate))
        group = max(1, min(num_mentions, memory_budget_bytes // (slice_size * per_candidate)))
        pieces = []
        for start in range(0, num_mentions, group):
            group_mentions = {
                b: {k: t[start : start + group] for k, t in part.items()} for b, part in mentions.items()
            }
            columns = []
            for first in range(0, num_candidates, slice_size):
                rows = candidate_rows[start : start + group, first : first + slice_size]  # (b, k)
                candidates = self._prepared_rows(rows)
                columns.append(model.score_prepared_candidates(group_mentions, candidates).logits)
            pieces.append(torch.cat(columns, dim=1))
        return torch.cat(pieces, dim=0)

    def _score_listed(
        self, model: M3ELModel, mentions: dict, candidate_rows: torch.Tensor, memory_budget_bytes: int
    ) -> torch.Tensor:
        """
        `score_prepared_candidates` through the fused kernel's candidates grid: the G2L parts from the index's own
        rows, the dot-product parts from gathered vectors (or every pair, then picked, when K * D >= E), a group of
        mentions at a time within the budget.
        """
        num_mentions, num_candidates = candidate_rows.shape
        widths = [t.shape[1] for k, t in self.tensors.items() if t.dim() == 2 and not k.endswith(".global")]
        per_mention = 4 * sum(min(len(self), num_candidates * w) for w in widths) + 16 * num_candidates
        group = max(1, min(num_mentions, memory_budget_bytes // per_mention))
        entities = self._prepared(0, len(self))
        pieces = []
        for start in range(0, num_mentions, group):
            part = {b: {k: t[start : start + group] for k, t in p.items()} for b, p in mentions.items()}
            logits = model.score_prepared(part, entities, candidates=candidate_rows[start : start + group]).logits
            pieces.append(logits.float())
        return torch.cat(pieces)

    def _prepared_rows(
        self, rows: torch.Tensor, branch: str | None = None, keep: Sequence[str] | None = None
    ) -> dict[str, dict[str, torch.Tensor]]:
        """The index tensors at `rows` (b, k), each of shape (b, k, ...), nested like `prepare_entities` (those of
        one `branch` only, if given; of its tensors, only those named in `keep`, if given). Gathered with
        `index_select` (on the CPU up to several times faster than indexing with a 2-D tensor, same values)."""
        prepared: dict[str, dict[str, torch.Tensor]] = {}
        flat = rows.reshape(-1)
        for key, tensor in self.tensors.items():
            name, part = key.split(".", 1)
            if (branch is None or name == branch) and (keep is None or part in keep):
                gathered = tensor.index_select(0, flat).view(*rows.shape, *tensor.shape[1:])
                prepared.setdefault(name, {})[part] = gathered
        return prepared

    def _bytes_per_candidate(self) -> int:
        """Memory one gathered (mention, candidate) pair takes: its index rows plus its attention scores."""
        row = sum(t[0].numel() * t.element_size() for t in self.tensors.values())
        tokens = [self.tensors[k].shape[1] ** 2 for k in ("text.query", "image.query") if k in self.tensors]
        return row + 3 * max(tokens, default=1) * 4

    def _score_pairs(
        self, model: M3ELModel, mentions: dict, mention_rows: torch.Tensor, entity_rows: torch.Tensor,
        memory_budget_bytes: int, block: str | None = None,
    ) -> torch.Tensor:
        """
        Exact final scores (P,) of the pairs (mention_rows[p], entity_rows[p]), mentions already prepared and on this
        index's device and dtype. The pairs of one mention are laid out in rows of W candidates (the last row of a
        mention padded with its first entity, whose score is dropped), so that each mention's tensors are gathered
        once per row rather than once per pair, and scored with `score_prepared_candidates`, rows grouped to fit
        `memory_budget_bytes`. With `block` ("text" or "image"), that block's G2L part of the score instead.
        """
        num_pairs = mention_rows.shape[0]
        if num_pairs == 0:
            return torch.zeros(0, dtype=torch.promote_types(self.dtype, torch.float32), device=self.device)
        num_mentions = next(iter(next(iter(mentions.values())).values())).shape[0]
        order, sorted_mentions, counts, slot = _group_by_mention(mention_rows, num_mentions)
        memory_budget_bytes = self._piece_bytes(memory_budget_bytes)
        # W: a quarter of the mean count per mention, so padding adds at most a quarter to the work.
        per_candidate = self._bytes_per_candidate()
        width = -(-num_pairs // (4 * int((counts > 0).sum())))
        width = max(1, min(width, memory_budget_bytes // per_candidate))
        rows_per_mention = -(-counts // width)
        row = (torch.cumsum(rows_per_mention, 0) - rows_per_mention)[sorted_mentions] + slot // width
        column = slot % width
        num_rows = int(rows_per_mention.sum())
        row_mention = torch.repeat_interleave(torch.arange(num_mentions, device=self.device), rows_per_mention)
        grid = torch.full((num_rows, width), -1, dtype=torch.long, device=self.device)
        grid[row, column] = entity_rows[order]
        grid = torch.where(grid < 0, grid[:, :1], grid)
        mention_row_bytes = sum(t[0].numel() * t.element_size() for part in mentions.values() for t in part.values())
        group = max(1, memory_budget_bytes // (width * per_candidate + mention_row_bytes))
        pieces = []
        for start in range(0, num_rows, group):
            owners = row_mention[start : start + group]
            if block is not None:
                matching = getattr(model, f"{block}_matching")
                gathered = {k: mentions[block][k][owners] for k in ("key", "value")}  # what G2L reads
                candidates = self._prepared_rows(grid[start : start + group], block, ("query", "global"))[block]
                logits = matching.global_to_local(gathered, candidates)
            else:
                gathered = {b: {k: t[owners] for k, t in part.items()} for b, part in mentions.items()}
                candidates = self._prepared_rows(grid[start : start + group])
                logits = model.score_prepared_candidates(gathered, candidates).logits
            pieces.append(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        pieces = torch.cat(pieces)
        scores = torch.empty(num_pairs, dtype=pieces.dtype, device=self.device)
        scores[order] = pieces[row, column]
        return scores

    def _fused(self) -> bool:
        """Whether the G2L scores of this index go through the fused kernel (CUDA, Triton; see `kernels_m3el.py`)."""
        query = next((self.tensors[k] for k in ("text.query", "image.query") if k in self.tensors), None)
        return query is not None and fused_g2l_wanted(query)

    def _count_steps(
        self, stats: dict | None, needed: torch.Tensor, blocks: Sequence[str] | None = None, every_pair: bool = False
    ):
        """
        Add to `stats` the fused kernels' program steps for the G2L `blocks` (default: all) of the pairs of `needed`
        (B, chunk), whether or not the kernels score them here: `steps_candidates` (each mention's list, the
        candidates kernel) and `steps_grid` (the masked grid: a step wherever one of its tile's entities is
        needed); with `every_pair`, also `steps_every_pair`, the steps of scoring every pair of the chunk in every
        block (the unmasked grid, as `scores` does). A step is one mention against a tile of a few entities
        (`kernels_m3el.entities_per_step` of this index's dtype, for that kernel's launch), the unit of the kernels'
        work.
        """
        if stats is None:
            return
        num_mentions, width = needed.shape
        per_mention = needed.sum(dim=1)
        for name in [b for b in ("text", "image") if f"{b}.query" in self.tensors]:
            tokens = self.tensors[f"{name}.query"].shape[1]
            tile, listed = entities_per_step(tokens, self.dtype), entities_per_step(tokens, self.dtype, True)
            counts = {"steps_every_pair": num_mentions * -(-width // tile)} if every_pair else {}
            if blocks is None or name in blocks:
                padded = torch.nn.functional.pad(needed, (0, -width % tile))
                counts["steps_candidates"] = int(((per_mention + listed - 1) // listed).sum())
                counts["steps_grid"] = int(padded.view(num_mentions, -1, tile).any(dim=2).sum())
            for key, value in counts.items():
                stats[key] = stats.get(key, 0) + value

    def _score_needed(
        self, model: M3ELModel, mentions: dict, start: int, stop: int, needed: torch.Tensor, memory_budget_bytes: int,
        block: str | None = None, known: tuple[str, torch.Tensor] | None = None,
    ):
        """
        Exact scores of the pairs where `needed` (B, stop - start) is set, through the fused kernel, which takes
        each mention's list of needed entities (or, with `pruned_scoring = "grid"`, skips the other pairs of the
        grid): (mention rows, entity rows, scores), in `needed`'s row-major order. With `block` ("text" or
        "image"), that block's G2L part of the score instead. `known`, (block, G2L scores (B, stop - start)): that
        block's part of every needed pair, already computed exactly (by `_refine`): the kernel then computes the
        other parts only, and the scores add them up as `score_prepared` does. Without the kernel (or should it
        fail: it is then turned off, with one warning), the grid is scored by PyTorch in pieces within the budget,
        or a block's part pair by pair, gathered.
        """
        if self.pruned_scoring not in ("grid", "candidates"):
            raise ValueError(f"pruned_scoring must be 'grid' or 'candidates', got {self.pruned_scoring!r}")
        rows, columns = needed.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return rows, columns + start, torch.zeros(0, dtype=torch.float32, device=self.device)
        if block is None:
            def score(entities, pick=lambda part: part, **which):  # pick: the known part's entries for `which`
                g2l = None if known is None else {known[0]: pick(known[1])}
                return model.score_prepared(mentions, entities, g2l=g2l, **which).logits
        else:
            matching = getattr(model, f"{block}_matching")

            def score(entities, pick=None, **which):
                return matching.global_to_local(mentions[block], entities[block], **which)
        if self._fused():  # (no longer, once the kernel has failed in an earlier chunk)
            try:
                with strict_kernel():
                    entities = self._prepared(start, stop)
                    if self.pruned_scoring == "candidates":  # each mention's needed entities, in one row
                        order, sorted_rows, counts, slots = _group_by_mention(rows, needed.shape[0])
                        candidates = torch.full((needed.shape[0], int(counts.max())), -1, device=self.device)
                        candidates[sorted_rows, slots] = columns[order]
                        scores = torch.empty(rows.shape, dtype=torch.float32, device=self.device)
                        listed = score(entities, lambda part: part.gather(1, candidates.clamp(min=0)),
                                       candidates=candidates)
                        scores[order] = listed[sorted_rows, slots].float()
                        return rows, columns + start, scores
                    return rows, columns + start, score(entities, needed=needed)[rows, columns].float()
            except FusedKernelError as error:
                record_failure(error)
        if block is not None:
            return rows, columns + start, self._score_pairs(
                model, mentions, rows, columns + start, memory_budget_bytes, block=block
            )
        step = self.chunk_size_for(needed.shape[0], self._piece_bytes(memory_budget_bytes))
        scores = torch.empty(rows.shape, dtype=torch.float32, device=self.device)
        for first in range(0, stop - start, step):
            inside = (columns >= first) & (columns < first + step)
            logits = score(self._prepared(start + first, min(start + first + step, stop)),
                           lambda part, first=first: part[:, first : first + step])
            scores[inside] = logits[rows[inside], columns[inside] - first].float()
        return rows, columns + start, scores

    def _refine(
        self, model: M3ELModel, mentions: dict, start: int, stop: int, parts: dict, pairs: torch.Tensor,
        lower: torch.Tensor, upper: torch.Tensor, memory_budget_bytes: int, stats: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int, tuple[str, torch.Tensor] | None]:
        """
        Narrower bounds for the pairs in `pairs` (B, stop - start): one G2L block's part computed exactly (the block
        whose interval over these pairs is widest per unit of work, tokens x tokens), in place of its interval
        (`parts`, from `score_bounds`). Returns (lower, upper, pairs refined, known): `known` is (the block, its
        exact part (B, stop - start), float32, NaN outside `pairs`), or None when nothing was refined, for
        `_score_needed` not to compute it again. Rounding: the exact score sums the same parts in float32, within
        the bounds' margin. `stats`: see `_count_steps` (the refined block's steps).
        """
        blocks = [name for name in ("text", "image") if name in parts]
        if not self.refine_bounds or len(blocks) < 2 or not pairs.any():
            return lower, upper, 0, None

        def width_per_work(name):  # the block's radius summed over the pairs, per tokens x tokens
            radius = parts[name][1]
            return float((radius * pairs).sum()) / self.tensors[f"{name}.query"].shape[1] ** 2

        block = max(blocks, key=width_per_work)
        self._count_steps(stats, pairs, [block])
        rows, columns, exact = self._score_needed(model, mentions, start, stop, pairs, memory_budget_bytes, block)
        columns = columns - start
        known = torch.full(pairs.shape, float("nan"), dtype=exact.dtype, device=self.device)
        known[rows, columns] = exact
        exact = exact.to(lower.dtype)
        radius = parts[block][1]
        center, radius = parts[block][0][columns], radius[rows, columns] if radius.dim() == 2 else radius[columns]
        scale = 2 * parts["branches"]
        lower[rows, columns] += (exact - center + radius) / scale
        upper[rows, columns] += (exact - center - radius) / scale
        return lower, upper, int(rows.numel()), (block, known)

    def _among_candidates(
        self, model: M3ELModel, mention_features: M3ELFeatures, k: int, candidates: int, chunk_size: int | None,
        memory_budget_bytes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`topk(candidates=...)` without the ids: exact scores (B, min(k, K)) float32 and entity rows of each
        mention's best among its K best-estimated entities, best first."""
        mentions, num_mentions = self._prepared_mentions(model, mention_features)
        chunks = self._bound_chunks(num_mentions, chunk_size, memory_budget_bytes)
        rows = self._best_estimated(model, mentions, candidates, chunks)  # (B, K)
        exact = self._score_prepared_candidates(model, mentions, rows, memory_budget_bytes).float()  # (model checked)
        _refuse_nan(exact, "score of one of the K candidates")
        values, slot = exact.topk(min(k, candidates), dim=1)
        return values, rows.gather(1, slot)

    def _best_estimated(self, model: M3ELModel, mentions: dict, count: int, chunks) -> torch.Tensor:
        """Rows (B, count) of each mention's `count` entities with the best `model.score_estimate`, best first."""
        best = None
        for start, stop in chunks:
            best = merge_topk(best, model.score_estimate(mentions, self._prepared(start, stop)), start, count)
        return best[1]

    def _on_index(self, mentions: dict) -> dict:
        """Prepared mention tensors moved to this index's device and dtype."""
        return {b: {k: t.to(self.device, self.dtype) for k, t in part.items()} for b, part in mentions.items()}

    def _check_device(self, model: M3ELModel) -> None:
        """Scoring uses the model's matching weights beside the index's tensors: both must be on one device."""
        if model.device != self.device:
            raise ValueError(
                f"the entity index is on {self.device} and the model on {model.device}: move one to the other's device "
                "(index.to(device=...) or model.to(...)) before scoring"
            )

    def _prepared_mentions(self, model: M3ELModel, mention_features: M3ELFeatures) -> tuple[dict, int]:
        """`model.prepare_mentions` on this index's device and dtype, and the number of mentions (at least 1)."""
        num_mentions = mention_features.text_embeds.shape[0]
        if num_mentions == 0:
            raise ValueError("no mentions to rank (a batch of 0)")
        self._check_use(model)
        return self._on_index(model.prepare_mentions(mention_features)), num_mentions

    def _bound_chunks(self, num_mentions: int, chunk_size: int | None, memory_budget_bytes: int):
        """Entity ranges for `score_bounds` and `score_estimate`: their float32 (B, chunk) products, bounds and masks,
        the (B, chunk, r) coordinates of the G2L bound (r: a block's mention tokens, at most d), and the chunk's entity
        vectors in float32 (and a temporary of each), within the budget."""
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        ranks = [min(self.tensors[f"{b}.query"].shape[1:]) for b in ("text", "image") if f"{b}.query" in self.tensors]
        floats_per_pair = 16 + max(ranks, default=0)
        floats_per_entity = 2 * sum(t.shape[1] for t in self.tensors.values() if t.dim() == 2)
        per_entity_bytes = 4 * (floats_per_pair * num_mentions + floats_per_entity)
        step = chunk_size or max(1, min(len(self), memory_budget_bytes // per_entity_bytes))
        for start in range(0, len(self), step):
            yield start, min(start + step, len(self))

    @torch.no_grad()
    def rank(
        self,
        model: M3ELModel,
        mention_features: M3ELFeatures,
        gold_entity_ids: Sequence[str],
        prune: bool = True,
        chunk_size: int | None = None,
        memory_budget_bytes: int = 2**30,
        stats: dict | None = None,
        candidates: int | None = None,
    ) -> torch.Tensor:
        """
        Rank of each mention's gold entity among all entities: 1 + the number of other entities whose
        score is >= the gold's (ties count against the gold).

        `candidates` (K): the rank a user of `topk(candidates=K)` (the pipeline's `candidates`) sees instead, to
        choose K: the gold's rank among its mention's K candidates by exact score (ties against the gold), and the
        worst rank, `len(self)`, for a gold that is not among them (`stats` then receives `among_candidates`, the
        number of golds that are). Hits@k for k <= K are then those of the pipeline; MR and MRR count a missed gold
        as last. K at least the KB size gives the exact ranks.

        With `prune` (the default) the result is the same, computed with less work: the gold's score is computed
        exactly, every other entity gets cheap bounds (`M3ELModel.score_bounds`: the dot-product parts of the score
        exactly, the G2L parts within an interval that holds for any mention), and only the entities whose bounds
        straddle the gold's score are scored exactly. `prune=False` scores every entity (`scores`). `stats`, a dict,
        receives `pairs` (mentions x entities), `scored` (pairs scored exactly, the gold pairs included), `refined`
        (pairs whose bounds were narrowed by one G2L block computed exactly, the gold pairs included; see
        `refine_bounds`) and the fused kernels' program steps for the pairs scored after the bounds, whichever path
        scored them: `steps_candidates`, `steps_grid` (see `pruned_scoring`) and `steps_every_pair` (see
        `_count_steps`).
        """
        if len(gold_entity_ids) != mention_features.text_embeds.shape[0]:
            raise ValueError(f"{len(gold_entity_ids)} gold ids for {mention_features.text_embeds.shape[0]} mentions")
        gold = self.positions(gold_entity_ids).to(self.device)
        candidates = check_candidates(candidates)
        if candidates is not None and candidates < len(self):
            values, rows = self._among_candidates(model, mention_features, candidates, candidates, chunk_size,
                                                  memory_budget_bytes)
            found = rows == gold[:, None]  # (B, K): at most one per row
            gold_values = values.masked_fill(~found, float("-inf")).max(dim=1, keepdim=True).values
            among = found.any(dim=1)
            ranks = torch.where(among, (values >= gold_values).sum(dim=1), len(self))
            if stats is not None:
                stats.update(pairs=rows.shape[0] * len(self), scored=rows.numel(), among_candidates=int(among.sum()))
            return ranks
        if not prune:
            scores = self.scores(model, mention_features, chunk_size, memory_budget_bytes)
            if stats is not None:
                stats.update(pairs=scores.numel(), scored=scores.numel())
            gold_scores = scores.gather(1, gold[:, None])
            _refuse_nan(gold_scores[:, 0], "gold entity's score")
            return (scores >= gold_scores).sum(dim=1)
        mentions, num_mentions = self._prepared_mentions(model, mention_features)
        everyone = torch.arange(num_mentions, device=self.device)
        gold_scores = self._score_pairs(model, mentions, everyone, gold, memory_budget_bytes)
        _refuse_nan(gold_scores, "gold entity's score")
        above = torch.zeros(num_mentions, dtype=torch.long, device=self.device)
        fused = self._fused()
        spans = model.mention_spans(mentions)
        pair_mentions, pair_entities, pair_scores = [], [], []
        final_gold = torch.empty_like(gold_scores)
        refined, steps = 0, {} if stats is not None else None
        for start, stop in self._bound_chunks(num_mentions, chunk_size, memory_budget_bytes):
            parts = {}
            lower, upper = model.score_bounds(mentions, self._prepared(start, stop), spans, parts)
            others = torch.arange(start, stop, device=self.device)[None, :] != gold[:, None]
            surely_above = (lower >= gold_scores[:, None]) & others
            undecided = (upper >= gold_scores[:, None]) & others & ~surely_above
            # one G2L block exactly for the undecided pairs (and the gold pairs, scored in full with them below):
            # most of them are decided then
            lower, upper, count, known = self._refine(
                model, mentions, start, stop, parts, undecided | ~others, lower, upper, memory_budget_bytes, steps
            )
            if count:
                refined += count
                surely_above |= undecided & (lower >= gold_scores[:, None])
                undecided &= (upper >= gold_scores[:, None]) & ~surely_above
            above += surely_above.sum(dim=1)
            self._count_steps(steps, undecided | ~others, _other_blocks(parts, known), every_pair=True)
            if fused:  # the undecided pairs and the gold pairs of this chunk, through the kernel (the refined
                # block's part as computed)
                rows, entities, scores = self._score_needed(
                    model, mentions, start, stop, undecided | ~others, memory_budget_bytes, known=known
                )
                is_gold = entities == gold[rows]
                final_gold[rows[is_gold]] = scores[is_gold].to(final_gold.dtype)
                pair_mentions.append(rows[~is_gold])
                pair_scores.append(scores[~is_gold])
            else:
                rows, columns = undecided.nonzero(as_tuple=True)
                pair_mentions.append(rows)
                pair_entities.append(columns + start)
        pair_mentions = torch.cat(pair_mentions)
        if fused:
            gold_scores, scores = final_gold, torch.cat(pair_scores).to(final_gold.dtype)
        else:
            # The gold pairs again, scored in the same call as the undecided pairs they are compared with.
            scores = self._score_pairs(
                model, mentions, torch.cat([everyone, pair_mentions]), torch.cat([gold, torch.cat(pair_entities)]),
                memory_budget_bytes,
            )
            gold_scores, scores = scores[:num_mentions], scores[num_mentions:]
        above.index_add_(0, pair_mentions, (scores >= gold_scores[pair_mentions]).long())
        if stats is not None:
            stats.update(pairs=num_mentions * len(self), scored=2 * num_mentions + pair_mentions.numel(),
                         refined=refined, **steps)
        return above + 1

    @torch.no_grad()
    def topk(
        self,
        model: M3ELModel,
        mention_features: M3ELFeatures,
        k: int = 10,
        prune: bool = True,
        chunk_size: int | None = None,
        memory_budget_bytes: int = 2**30,
        stats: dict | None = None,
        candidates: int | None = None,
    ):
        """
        Top-k entities per mention by exact score: (scores (B, k) float32, entity rows (B, k), entity ids [[...]]).

        With `prune` (the default), the same top k with less work: the k entities with the best estimate
        (`M3ELModel.score_estimate`: dot products only) are scored exactly, the lowest of those k scores is one the
        true top k all reach, every entity gets cheap bounds on its score (`M3ELModel.score_bounds`), and only those
        whose upper bound reaches it are scored exactly. `prune=False` scores every entity. `stats` as in `rank`.

        `candidates` (K), for KBs too large to rank in full per request: the K entities with the best estimate are
        scored exactly and the top k of those returned (k at most K; `prune` does not apply). Approximate: an entity
        whose G2L parts lift it above its estimate's top K is missed (`modeling_m3el.retrieval` measures how often,
        and searches with faiss). K at least the KB size is the exact top k.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        candidates = check_candidates(candidates)
        if candidates is not None and candidates < len(self):
            values, rows = self._among_candidates(model, mention_features, k, candidates, chunk_size,
                                                  memory_budget_bytes)
            if stats is not None:
                stats.update(pairs=rows.shape[0] * len(self), scored=rows.shape[0] * candidates)
            return values, rows, [[self.entity_ids[r] for r in row] for row in rows.tolist()]
        k = min(k, len(self))
        if not prune:
            scores = self.scores(model, mention_features, chunk_size, memory_budget_bytes)
            if stats is not None:
                stats.update(pairs=scores.numel(), scored=scores.numel())
            values, rows = scores.float().topk(k, dim=1)
            return values, rows, [[self.entity_ids[r] for r in row] for row in rows.tolist()]
        mentions, num_mentions = self._prepared_mentions(model, mention_features)
        chunks = list(self._bound_chunks(num_mentions, chunk_size, memory_budget_bytes))
        # Pass 1: the k entities of each mention with the best estimate, scored exactly: the k-th best of these
        # scores is a score the true top k all reach.
        spans = model.mention_spans(mentions)
        seeds = self._best_estimated(model, mentions, k, chunks).reshape(-1)
        everyone = torch.arange(num_mentions, device=self.device).repeat_interleave(k)
        threshold = self._score_pairs(model, mentions, everyone, seeds, memory_budget_bytes)
        threshold = threshold.view(num_mentions, k).min(dim=1).values  # NaN if any of the k is NaN
        _refuse_nan(threshold, "score of one of the k best-estimated entities")
        # Pass 2: exactly score every entity whose upper bound reaches that score.
        fused = self._fused()
        pair_mentions, pair_entities, pair_scores = [], [], []
        refined, steps = 0, {} if stats is not None else None
        for start, stop in chunks:
            parts = {}
            lower, upper = model.score_bounds(mentions, self._prepared(start, stop), spans, parts)
            candidates = upper >= threshold[:, None]
            lower, upper, count, known = self._refine(
                model, mentions, start, stop, parts, candidates, lower, upper, memory_budget_bytes, steps
            )
            if count:
                refined += count
                candidates &= upper >= threshold[:, None]
            self._count_steps(steps, candidates, _other_blocks(parts, known), every_pair=True)
            if fused:
                rows, entities, scores = self._score_needed(
                    model, mentions, start, stop, candidates, memory_budget_bytes, known=known
                )
                pair_scores.append(scores)
            else:
                rows, entities = candidates.nonzero(as_tuple=True)
                entities = entities + start
            pair_mentions.append(rows)
            pair_entities.append(entities)
        pair_mentions, pair_entities = torch.cat(pair_mentions), torch.cat(pair_entities)
        if fused:
            scores = torch.cat(pair_scores)
        else:
            scores = self._score_pairs(model, mentions, pair_mentions, pair_entities, memory_budget_bytes)
        if stats is not None:
            stats.update(pairs=num_mentions * len(self), scored=everyone.numel() + pair_mentions.numel(),
                         refined=refined, **steps)
        # Each mention's candidates into one row (padded with -inf), then the top k of every row.
        order, pair_mentions, counts, slots = _group_by_mention(pair_mentions, num_mentions)
        pair_entities, scores = pair_entities[order], scores[order]
        width = int(counts.max())
        padded = torch.full((num_mentions, width), float("-inf"), dtype=scores.dtype, device=self.device)
        padded[pair_mentions, slots] = scores
        entity_rows = torch.zeros((num_mentions, width), dtype=torch.long, device=self.device)
        entity_rows[pair_mentions, slots] = pair_entities
        values, slot = padded.topk(k, dim=1)
        rows = entity_rows.gather(1, slot)
        return values.float(), rows, [[self.entity_ids[r] for r in row] for row in rows.tolist()]


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, values: torch.Tensor, start: int, k: int):
    """
    A running top k over blocks of columns: `best`, (values, rows) (B, <= k) of the blocks so far (None before the
    first), and `values` (B, n) of the columns `start` to `start + n`, give (values, rows) (B, <= k) of them all, best
    first. Only each block's own top k is kept beside `best`, never a copy of the block.
    """
    values, rows = values.topk(min(k, values.shape[1]), dim=1)
    rows = rows + start
    if best is not None:
        values, slot = torch.cat([best[0], values], dim=1).topk(min(k, best[0].shape[1] + values.shape[1]), dim=1)
        rows = torch.cat([best[1], rows], dim=1).gather(1, slot)
    return values, rows


def check_candidates(candidates) -> int | None:
    """`candidates` of `topk`, `rank` and the pipeline: None or a positive integer (returned as an int)."""
    if candidates is not None and (
        isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates <= 0
    ):
        raise ValueError(f"candidates must be a positive integer, got {candidates!r}")
    return None if candidates is None else int(candidates)


def _other_blocks(parts: dict, known: tuple[str, torch.Tensor] | None) -> list[str] | None:
    """The G2L blocks still to compute for pairs whose `known` block (from `_refine`) is computed: None for all."""
    if known is None:
        return None
    return [name for name in ("text", "image") if name in parts and name != known[0]]


def _group_by_mention(mention_rows: torch.Tensor, num_mentions: int):
    """
    Pairs listed by mention row, grouped: (order that sorts them by mention, stably; the sorted mention rows;
    pairs per mention (num_mentions,); each sorted pair's slot among its mention's pairs).
    """
    order = torch.argsort(mention_rows, stable=True)
    sorted_rows = mention_rows[order]
    counts = torch.bincount(sorted_rows, minlength=num_mentions)
    first_slot = torch.cumsum(counts, 0) - counts  # where each mention's pairs start in the sorted list
    slots = torch.arange(sorted_rows.numel(), device=sorted_rows.device) - first_slot[sorted_rows]
    return order, sorted_rows, counts, slots


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _remove_stale_saves(
    folder: str | os.PathLike, prefix: str = _SAVE_PREFIX, older_than: float | None = None
) -> None:
    """
    Remove the temporary folders (named `prefix`...) that saves into `folder` killed midway left (a full index each):
    those in which nothing changed for `older_than` seconds (default `STALE_SAVE_SECONDS`), so that a save running
    beside this one (another process) keeps its own. Best effort: what cannot be removed stays.
    """
    older_than = STALE_SAVE_SECONDS if older_than is None else older_than
    now = time.time()
    try:
        entries = [entry for entry in os.scandir(folder) if entry.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            latest = max([entry.stat(follow_symlinks=False).st_mtime]
                         + [inner.stat(follow_symlinks=False).st_mtime for inner in os.scandir(entry.path)])
            if now - latest > older_than:
                shutil.rmtree(entry.path, ignore_errors=True)
        except OSError:
            continue


def _refuse_nan(scores: torch.Tensor, what: str) -> None:
    """Ranks against a NaN score mean nothing: name the mentions whose score (B,), or one of whose scores (B, K),
    is not a number."""
    nan = torch.isnan(scores)
    bad = (nan.any(dim=1) if nan.dim() == 2 else nan).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the {what} is NaN for mention(s) {bad[:10]} of this batch (NaN features or weights?); "
            "ranks against it would be meaningless"
        )


__all__ = ["EntityIndex", "StaleIndexError", "model_fingerprint"]
