"""EntityIndex: a KB's entity-side features, precomputed once for a given M3EL model, and exact ranking against it."""

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import torch
from safetensors.torch import load_file, save_file

from .modeling_m3el import M3ELFeatures, M3ELModel

INDEX_WEIGHTS = "entity_index.safetensors"
INDEX_META = "entity_index.json"
INDEX_FORMAT = 1
# Config fields that say nothing about the scores, left out of the fingerprint.
_FINGERPRINT_SKIP = {
    "transformers_version", "_name_or_path", "architectures", "auto_map", "custom_pipelines", "dtype", "torch_dtype",
}


def _scoring_config(config: dict) -> dict:
    """The config without the fields that say nothing about the scores, at every level (sub-configs carry a dtype)."""
    return {k: _scoring_config(v) if isinstance(v, dict) else v for k, v in config.items() if k not in _FINGERPRINT_SKIP}


class StaleIndexError(ValueError):
    """The index was built with another model (weights or config) than the one asked to rank with it."""


def model_fingerprint(model: M3ELModel) -> str:
    """
    Hash of the model's config and weights. Weights are hashed after rounding to bfloat16, so the same checkpoint
    loaded in float32 or bfloat16 has one fingerprint, while any training step changes it. (Loaded in float16, a
    weight is rounded twice and may hash differently: rebuild the index, or load the model in bfloat16.)
    """
    digest = hashlib.blake2b(digest_size=16)
    config = _scoring_config(model.config.to_dict())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if tensor.is_floating_point():
            tensor = tensor.detach().to(torch.bfloat16).view(torch.int16)
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _add_prepared(parts: dict[str, list[torch.Tensor]], model: M3ELModel, features: M3ELFeatures, **to) -> None:
    """Append `model.prepare_entities(features)` to `parts`, flattened to `"{branch}.{name}"`, moved with `to`
    (a `dtype` of None keeps each tensor's)."""
    dtype = to.pop("dtype", None)
    for branch, part in model.prepare_entities(features).items():
        for name, tensor in part.items():
            parts.setdefault(f"{branch}.{name}", []).append(tensor.to(dtype=dtype or tensor.dtype, **to))


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
    with `scores`, `rank` or `topk`.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], entity_ids: Sequence[str], fingerprint: str):
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
        self.tensors = tensors
        self.entity_ids = list(entity_ids)
        self.fingerprint = fingerprint
        self._position = {entity_id: i for i, entity_id in enumerate(self.entity_ids)}

    def __len__(self) -> int:
        return len(self.entity_ids)

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
        tensors = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        return EntityIndex(tensors, self.entity_ids, self.fingerprint)

    def positions(self, entity_ids: Iterable[str]) -> torch.Tensor:
        """Row of each entity id; an unknown id raises a KeyError naming it."""
        rows = []
        for entity_id in entity_ids:
            if entity_id not in self._position:
                raise KeyError(f"entity id {entity_id!r} is not in the index")
            rows.append(self._position[entity_id])
        return torch.tensor(rows, dtype=torch.long)

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
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, num_entities, step):
            batch = M3ELFeatures(**{k: v[start : start + step].to(model.device) for k, v in features.items()})
            _add_prepared(parts, model, batch, device=device, dtype=dtype)
        tensors = {name: torch.cat(pieces) if len(pieces) > 1 else pieces[0] for name, pieces in parts.items()}
        return cls(tensors, entity_ids, model_fingerprint(model))

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
        model_device = model.device
        parts: dict[str, list[torch.Tensor]] = {}
        batches = range(0, len(entity_ids), batch_size)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Indexing entities", unit="batch")
        for start in batches:
            batch = {k: v[start : start + batch_size].to(model_device, non_blocking=True) for k, v in inputs.items()}
            _add_prepared(parts, model, model.encode(**batch, side="entity"), device=device, dtype=dtype)
        tensors = {name: torch.cat(pieces) for name, pieces in parts.items()}
        return cls(tensors, [str(e) for e in entity_ids], model_fingerprint(model))

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
    ) -> "EntityIndex":
        """
        Encode a KB in batches. `entities`: dicts with `id`, `name`, `description` and `image` (a path, PIL image,
        bytes or None; the first image of an entity, as in evaluation). The index is kept in `dtype`
        (default: the model's) on `device` (default: the model's).

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
        share = -(-len(entities) // world)
        local = entities[rank * share : (rank + 1) * share]
        parts: dict[str, list[torch.Tensor]] = {}
        batches = range(0, len(local), batch_size)
        if progress and rank == 0:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="Indexing entities", unit="batch")
        for start in batches:
            chunk = local[start : start + batch_size]
            inputs = processor.process_entities(
                [e["name"] for e in chunk],
                [e["description"] for e in chunk],
                [e.get("image") for e in chunk],
                image_names=[f"entity {e['id']!r} image {e.get('image')!r}" for e in chunk],
            ).to(model_device)
            _add_prepared(parts, model, model.encode(**inputs, side="entity"), dtype=dtype)
        if not parts:  # this process's share is empty (more processes than entities): shapes from one entity
            probe = cls.build(model, processor, entities[:1], batch_size=1, dtype=dtype, progress=False)
            parts = {name: [tensor[:0].to(model_device)] for name, tensor in probe.tensors.items()}
        tensors = {name: torch.cat(pieces) for name, pieces in parts.items()}
        if world > 1:
            tensors = {name: gather_shares(accelerator, t, share, len(entities)) for name, t in tensors.items()}
        tensors = {name: tensor.to(device) for name, tensor in tensors.items()}
        return cls(tensors, [str(e["id"]) for e in entities], model_fingerprint(model))

    # --------------------------------------------------------------------------------------------- save/load

    def save(self, folder: str | os.PathLike) -> None:
        """Write `entity_index.safetensors` and `entity_index.json` into `folder`, atomically (temp, then rename)."""
        os.makedirs(folder, exist_ok=True)
        meta = {
            "format": INDEX_FORMAT,
            "fingerprint": self.fingerprint,
            "num_entities": len(self),
            "dtype": str(self.dtype).replace("torch.", ""),
            "entity_ids": self.entity_ids,
        }
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        with tempfile.TemporaryDirectory(dir=folder, prefix=".entity_index.") as tmp:
            save_file(tensors, os.path.join(tmp, INDEX_WEIGHTS), metadata={"fingerprint": self.fingerprint})
            with open(os.path.join(tmp, INDEX_META), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            # Weights first, metadata last: a crash between the two leaves a fingerprint mismatch, never a silent mix.
            os.replace(os.path.join(tmp, INDEX_WEIGHTS), os.path.join(folder, INDEX_WEIGHTS))
            os.replace(os.path.join(tmp, INDEX_META), os.path.join(folder, INDEX_META))

    @classmethod
    def load(
        cls, folder: str | os.PathLike, model: M3ELModel | None = None, device=None, dtype=None
    ) -> "EntityIndex":
        """
        Load an index saved with `save`. With `model`, refuse (StaleIndexError) an index built with another model.
        """
        meta_path, weights_path = os.path.join(folder, INDEX_META), os.path.join(folder, INDEX_WEIGHTS)
        for path in (meta_path, weights_path):
            if not os.path.exists(path):
                raise FileNotFoundError(f"no entity index in {folder}: {os.path.basename(path)} is missing")
        with open(meta_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{meta_path}: not valid JSON ({error})") from None
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{meta_path}: index format {meta.get('format')!r}, this code reads {INDEX_FORMAT}")
        from safetensors import safe_open

        with safe_open(weights_path, framework="pt") as f:
            weights_fingerprint = (f.metadata() or {}).get("fingerprint")
        if weights_fingerprint != meta["fingerprint"]:
            raise ValueError(
                f"{folder}: {INDEX_WEIGHTS} and {INDEX_META} come from different builds (interrupted save?); rebuild"
            )
        if model is not None:
            current = model_fingerprint(model)
            if current != meta["fingerprint"]:
                raise StaleIndexError(
                    f"the entity index in {folder} was built with another model (fingerprint {meta['fingerprint']}, "
                    f"this model: {current}); rebuild it with EntityIndex.build(model, processor, entities)"
                )
        tensors = load_file(weights_path, device=str(device) if device is not None else "cpu")
        if dtype is not None:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        return cls(tensors, meta["entity_ids"], meta["fingerprint"])

    # -------------------------------------------------------------------------------------------------- rank

    def _prepared(self, start: int, stop: int) -> dict[str, dict[str, torch.Tensor]]:
        prepared: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            branch, name = key.split(".", 1)
            prepared.setdefault(branch, {})[name] = tensor[start:stop]
        return prepared

    def check_model(self, model: M3ELModel) -> None:
        if model_fingerprint(model) != self.fingerprint:
            raise StaleIndexError("this entity index was built with another model; rebuild it for this one")

    @torch.no_grad()
    def scores(
        self, model: M3ELModel, mention_features: M3ELFeatures, chunk_size: int | None = None,
        memory_budget_bytes: int = 2**30,
    ) -> torch.Tensor:
        """
        Exact final scores (B, E) of mentions against every entity. Entities are taken `chunk_size` at a time
        (default: as many as fit `memory_budget_bytes` of attention scores), so no (mention x entity x token x
        token) tensor for the whole KB ever exists.
        """
        num_mentions = mention_features.text_embeds.shape[0]
        if num_mentions == 0:
            raise ValueError("no mentions to rank (a batch of 0)")
        mentions = model.prepare_mentions(mention_features)
        mentions = {b: {k: t.to(self.device, self.dtype) for k, t in part.items()} for b, part in mentions.items()}
        if chunk_size is None:
            chunk_size = self.chunk_size_for(num_mentions, memory_budget_bytes)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        pieces = []
        for start in range(0, len(self), chunk_size):
            pieces.append(model.score_prepared(mentions, self._prepared(start, start + chunk_size)).logits)
        return torch.cat(pieces, dim=1)

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
        mentions = {b: {k: t.to(self.device, self.dtype) for k, t in part.items()} for b, part in mentions.items()}
        num_candidates = candidate_rows.shape[1]
        per_candidate = self._bytes_per_candidate()
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

    def _prepared_rows(self, rows: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """The index tensors at `rows` (b, k), each of shape (b, k, ...), nested like `prepare_entities`."""
        prepared: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.tensors.items():
            branch, name = key.split(".", 1)
            prepared.setdefault(branch, {})[name] = tensor[rows]
        return prepared

    def _bytes_per_candidate(self) -> int:
        """Memory one gathered (mention, candidate) pair takes: its index rows plus its attention scores."""
        row = sum(t[0].numel() * t.element_size() for t in self.tensors.values())
        tokens = [self.tensors[k].shape[1] ** 2 for k in ("text.query", "image.query") if k in self.tensors]
        return row + 3 * max(tokens, default=1) * 4

    @torch.no_grad()
    def rank(self, model: M3ELModel, mention_features: M3ELFeatures, gold_entity_ids: Sequence[str], **kwargs):
        """
        Rank of each mention's gold entity among all entities (SPEC 6): 1 + the number of other entities whose
        score is >= the gold's (ties count against the gold).
        """
        if len(gold_entity_ids) != mention_features.text_embeds.shape[0]:
            raise ValueError(f"{len(gold_entity_ids)} gold ids for {mention_features.text_embeds.shape[0]} mentions")
        scores = self.scores(model, mention_features, **kwargs)
        gold = self.positions(gold_entity_ids).to(scores.device)
        gold_scores = scores.gather(1, gold[:, None])
        return (scores >= gold_scores).sum(dim=1)

    @torch.no_grad()
    def topk(self, model: M3ELModel, mention_features: M3ELFeatures, k: int = 10, **kwargs):
        """Top-k entities per mention: (scores (B, k), entity rows (B, k), entity ids [[...]])."""
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        scores = self.scores(model, mention_features, **kwargs)
        values, rows = scores.float().topk(min(k, len(self)), dim=1)
        ids = [[self.entity_ids[r] for r in row] for row in rows.tolist()]
        return values, rows, ids


__all__ = ["EntityIndex", "StaleIndexError", "model_fingerprint"]
