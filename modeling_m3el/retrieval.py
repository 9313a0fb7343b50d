"""Two-stage retrieval for large KBs: an inner-product search over the cheap estimate of M3EL's score (its dot-product
parts and the G2L parts' centres, `M3ELModel.score_estimate`) proposes K candidates per mention, and the exact score
re-ranks them."""

import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .index_m3el import EntityIndex, StaleIndexError, _one_line, _remove_stale_saves, merge_topk
from .modeling_m3el import DOT_PRODUCT_PARTS, M3ELFeatures, M3ELModel

BACKENDS = ("flat", "ivf", "hnsw", "torch")
RETRIEVER_FAISS = "entity_index.faiss"
RETRIEVER_META = "retriever.json"
RETRIEVER_FORMAT = 2  # 2: the G2L centres' column added to the vectors
_SAVE_PREFIX = ".retriever."  # `save`'s temporary folder

# `DOT_PRODUCT_PARTS` as `EntityIndex` tensor names ("{branch}.{name}") with their weights inside their branch.
DENSE_PARTS = tuple((f"{branch}.{name}", weight) for branch, name, weight in DOT_PRODUCT_PARTS)


def _num_branches(keys) -> int:
    """Branches of the final score, read from the prepared tensors' names (the config's `branches`)."""
    keys = list(keys)
    return sum(key in keys for key in ("text.embeds", "image.embeds")) + sum(k.startswith("cross_modal.") for k in keys)


@torch.no_grad()
def _dense(tensors: Mapping[str, torch.Tensor], model: M3ELModel | None = None) -> torch.Tensor:
    """
    Concatenate the dense parts of prepared tensors into float32 vectors (n, D), D their widths plus one. The entity
    side (with its `model`) is weighted by the score's weights, and its last column holds the G2L parts' centres,
    `sum_b <c_e, beta_b> / 2`, over the number of branches. The mention side (no model) stays the plain prepared
    vectors, with 1 in the last column.
    """
    present = [(key, weight) for key, weight in DENSE_PARTS if key in tensors]
    if not present:
        raise ValueError("the model has no branch with a dense part (G2G text, G2G image or cross-modal)")
    num_branches = _num_branches(tensors)
    first = tensors[present[0][0]]
    width = sum(tensors[key].shape[-1] for key, _ in present)
    vectors = torch.empty((first.shape[0], width + 1), dtype=torch.float32, device=first.device)  # (n, D)
    column = 0
    for key, weight in present:
        part = vectors[:, column : column + tensors[key].shape[-1]]
        part.copy_(tensors[key])  # in place, column by column: no second (n, D) copy of a large KB
        if model is not None:
            part.mul_(weight / num_branches)
        column += tensors[key].shape[-1]
    if model is None:
        vectors[:, -1] = 1.0
    else:
        vectors[:, -1] = 0.0
        for name, block in model._intra_modal_blocks():
            vectors[:, -1] += block.global_to_local_center({"global": tensors[f"{name}.global"]}).float() / 2
        vectors[:, -1] /= num_branches
    return vectors


def _flattened(prepared: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{branch}.{name}": tensor for branch, part in prepared.items() for name, tensor in part.items()}


def dense_entity_vectors(index: EntityIndex, model: M3ELModel) -> torch.Tensor:
    """
    Entity vectors (E, D), float32, on the index's device, such that `dense_mention_vectors(model, m) @ v.T` is
    `model.score_estimate`: the dot-product parts of the final score, `(g2g_text / 2 + g2g_image / 2 + s_t2v
    [+ s_v2t]) / num_branches`, plus each G2L part at its centre, `(<c_e, beta_text> / 2 + <c_e, beta_image> / 2) /
    num_branches`; that is, the score `S` with its G2L parts replaced by their centres.
    """
    return _dense(index.tensors, model)


def dense_mention_vectors(model: M3ELModel, mention_features: M3ELFeatures) -> torch.Tensor:
    """Mention vectors (B, D), float32, the other half of `dense_entity_vectors`."""
    return dense_mention_vectors_prepared(model.prepare_mentions(mention_features))


def dense_mention_vectors_prepared(mentions: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """`dense_mention_vectors` from the output of `model.prepare_mentions`."""
    return _dense(_flattened(mentions))


@dataclass
class CandidateRecall:
    """
    How often the exact top-1 entity of a mention is among its K first-stage candidates.

    Args:
        recall (`float`): `hits / count`.
        hits (`int`): mentions whose exact top-1 is among their candidates.
        count (`int`): mentions.
        k_candidates (`int`): K, after clipping to the KB size.
        found (`torch.BoolTensor` of shape `(count,)`): per mention.
    """

    recall: float
    hits: int
    count: int
    k_candidates: int
    found: torch.Tensor = field(repr=False)

    @classmethod
    def of(cls, candidate_rows: torch.Tensor, exact_top1_rows: torch.Tensor) -> "CandidateRecall":
        """From each mention's K candidate rows (B, K) and its exact top-1 row (B,)."""
        found = (candidate_rows == exact_top1_rows.to(candidate_rows.device)[:, None]).any(dim=1).cpu()
        hits = int(found.sum())
        return cls(recall=hits / len(found), hits=hits, count=len(found), k_candidates=candidate_rows.shape[1],
                   found=found)


class TwoStageRetriever:
    """
    Retrieval over a large KB in two stages. Stage 1: an inner-product search over `dense_entity_vectors(index,
    model)` with `dense_mention_vectors` returns the K entities with the best estimate of the score,
    `M3ELModel.score_estimate` (the dot-product parts: G2G text, G2G image, cross-modal; and the G2L parts' centres),
    the candidates of `EntityIndex.topk(candidates=K)` when the search is exhaustive. Stage 2: the exact M3EL score
    (`EntityIndex.score_candidates`, the G2L parts included) re-ranks those K. K smaller than the KB can miss the
    exact top-1 (`candidate_recall` measures how often). K at least the KB size is exact with every backend: the
    approximate searches ("ivf" with `nprobe < nlist`, "hnsw") can return fewer than K entities, so stage 1 is then
    an exhaustive product over the dense vectors (`candidates`), and `search` ranks the whole KB with
    `EntityIndex.topk`.

    Args:
        index ([`EntityIndex`]): the KB, built with `model`.
        model ([`M3ELModel`]): the model the index was built with (checked unless `check_model=False`).
        k_candidates (`int`, *optional*, defaults to 100): K. Clipped to the KB size (K at least the KB size means
            the whole KB, i.e. exact ranking, whatever the backend).
        backend (`str`, *optional*, defaults to `"flat"`): the stage-1 search.
            - `"flat"`: faiss `IndexFlatIP`, exhaustive.
            - `"ivf"`: faiss `IndexIVFFlat` with `nlist` k-means cells, `nprobe` of them searched per mention
              (`nprobe == nlist`: exhaustive).
            - `"hnsw"`: faiss `IndexHNSWFlat` with `hnsw_m` links per node; `hnsw_ef_search` (at least K) sets the
              search breadth (at least the KB size: every reachable entity is visited).
            - `"torch"`: exhaustive matrix products on the index's device, no faiss (the fast path on a GPU when
              no GPU build of faiss is installed).
        use_gpu (`bool`, *optional*): put the faiss index ("flat", "ivf") on GPU 0 when faiss has GPU support and
            sees a GPU; otherwise warn and stay on the CPU.
        nlist (`int`, *optional*): IVF cells, default `4 * sqrt(E)`, clipped to [1, E].
        nprobe (`int`, *optional*): IVF cells searched, default `nlist // 8` (at least 1), clipped to nlist.
        hnsw_m (`int`, *optional*, defaults to 32), hnsw_ef_construction (`int`, *optional*, defaults to 80),
        hnsw_ef_search (`int`, *optional*, defaults to `max(256, K)`): HNSW parameters. Over 100k entities, a
            search breadth of 64 kept the exhaustive search's best estimate among 10 candidates for 96% of the demo
            model's test mentions, 256 for 99.7% (`benchmarks/README.md`). A saved retriever keeps the values it
            was built with (one saved when the default was `max(64, K)` keeps that; `load(..., hnsw_ef_search=256)`
            changes it).
        memory_budget_bytes (`int`, *optional*, defaults to 1 GiB): bounds the exact re-scoring's gathered tensors
            and the "torch" backend's score blocks.
        check_model (`bool`, *optional*, defaults to `True`): refuse (StaleIndexError) an index built with another
            model at once, before its vectors are searched for; hashes the model's weights once, unless the index was
            built or loaded with this model, unchanged since. With `False`, the first search refuses it instead (the
            index's scoring checks the model it is given: `EntityIndex.scores`).
        faiss_index (*optional*): an index already built over `dense_entity_vectors(index, model)` (what `load`
            passes).
    """

    def __init__(
        self,
        index: EntityIndex,
        model: M3ELModel,
        k_candidates: int = 100,
        backend: str = "flat",
        use_gpu: bool = False,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        hnsw_ef_construction: int = 80,
        hnsw_ef_search: int | None = None,
        memory_budget_bytes: int = 2**30,
        check_model: bool = True,
        faiss_index=None,
    ):
        if len(index) == 0:
            raise ValueError("cannot retrieve from an empty KB (the index holds 0 entities)")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.k_candidates = self._clipped_k(k_candidates, len(index))
        if check_model:
            index._check_known_model(model)
        self.index, self.model, self.backend = index, model, backend
        self.memory_budget_bytes = memory_budget_bytes
        self.use_gpu = use_gpu
        num_entities = len(index)
        self.nlist = min(max(1, nlist if nlist is not None else round(4 * math.sqrt(num_entities))), num_entities)
        self.nprobe = min(max(1, nprobe if nprobe is not None else self.nlist // 8), self.nlist)
        self.hnsw_m, self.hnsw_ef_construction = hnsw_m, hnsw_ef_construction
        self.hnsw_ef_search = hnsw_ef_search if hnsw_ef_search is not None else max(256, self.k_candidates)
        self.dim = 1 + sum(index.tensors[key].shape[-1] for key, _ in DENSE_PARTS if key in index.tensors)
        self._vectors = self._faiss = self._gpu_resources = self._exhaustive_vectors = None
        if backend == "torch":
            self._vectors = dense_entity_vectors(index, model)  # (E, D) float32
        else:
            if faiss_index is None:
                faiss_index = self._build_faiss(dense_entity_vectors(index, model))
            self._faiss = faiss_index
            if self._faiss.ntotal != num_entities or self._faiss.d != self.dim:
                raise ValueError(
                    f"the faiss index holds {self._faiss.ntotal} vectors of width {self._faiss.d}; the entity index "
                    f"needs {num_entities} of width {self.dim}"
                )
            self._set_search_parameters()
            if use_gpu:
                self._faiss = self._to_gpu(self._faiss)

    def __repr__(self) -> str:
        return (
            f"TwoStageRetriever({len(self.index)} entities, backend={self.backend!r}, K={self.k_candidates}, "
            f"dense width {self.dim})"
        )

    @staticmethod
    def _clipped_k(k: int, num_entities: int) -> int:
        if k is None or k <= 0:
            raise ValueError(f"k_candidates must be positive, got {k}")
        return min(int(k), num_entities)

    # ------------------------------------------------------------------------------------------------- faiss

    def _build_faiss(self, vectors: torch.Tensor):
        import faiss

        data = np.ascontiguousarray(vectors.cpu().numpy(), dtype=np.float32)
        if self.backend == "flat":
            index = faiss.IndexFlatIP(self.dim)
        elif self.backend == "ivf":
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(data)
        else:
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.hnsw_ef_construction
        index.add(data)
        return index

    def _set_search_parameters(self):
        if self.backend == "ivf":
            self._faiss.nprobe = self.nprobe

    def _to_gpu(self, index):
        import faiss

        if self.backend == "hnsw":
            warnings.warn("faiss has no GPU HNSW index; the HNSW search stays on the CPU", stacklevel=3)
            return index
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            warnings.warn(
                "use_gpu=True, but this faiss build has no GPU support or sees no GPU; searching on the CPU "
                "(backend='torch' searches on the index's device without faiss)",
                stacklevel=3,
            )
            return index
        self._gpu_resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)

    def _cpu_faiss(self):
        import faiss

        return faiss.index_gpu_to_cpu(self._faiss) if self._gpu_resources is not None else self._faiss

    # ------------------------------------------------------------------------------------------------ search

    def _stage_one(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimated scores and rows (B, k) of the best entities by the estimate; row -1 where the search found
        fewer (an approximate search for fewer than all entities)."""
        if self._vectors is not None:
            return self._torch_search(queries, k, self._vectors)
        if k >= len(self.index) and self.backend != "flat":  # every entity: exhaustive, as IVF and HNSW may not be
            if self._exhaustive_vectors is None:
                self._exhaustive_vectors = dense_entity_vectors(self.index, self.model)
            return self._torch_search(queries, k, self._exhaustive_vectors)
        if self.backend == "hnsw":  # HNSW returns at most efSearch results
            self._faiss.hnsw.efSearch = max(self.hnsw_ef_search, k)
        scores, rows = self._faiss.search(np.ascontiguousarray(queries.cpu().numpy(), dtype=np.float32), k)
        device = self.index.device
        return torch.from_numpy(scores).to(device), torch.from_numpy(rows).to(device)

    def _torch_search(self, queries: torch.Tensor, k: int, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.to(vectors.device)
        block = max(k, self.memory_budget_bytes // (4 * queries.shape[0]))
        best = None
        for start in range(0, vectors.shape[0], block):
            best = merge_topk(best, queries @ vectors[start : start + block].T, start, k)  # (B, block) scores
        return best

    def _check_mentions(self, mention_features: M3ELFeatures) -> None:
        if mention_features.text_embeds is None or mention_features.text_embeds.shape[0] == 0:
            raise ValueError("no mentions to retrieve for (a batch of 0)")

    @torch.no_grad()
    def candidates(
        self, mention_features: M3ELFeatures, k_candidates: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Stage 1 alone: dense scores and entity rows (B, K) of each mention's K candidates, best first
        (row -1 where an approximate search found fewer than K).
        """
        self._check_mentions(mention_features)
        k = self.k_candidates if k_candidates is None else self._clipped_k(k_candidates, len(self.index))
        return self._stage_one(dense_mention_vectors(self.model, mention_features), k)

    @torch.no_grad()
    def search(
        self, mention_features: M3ELFeatures, k: int = 10, k_candidates: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[list[str | None]]]:
        """
        Top-k entities per mention after exact re-scoring of the K candidates: (scores (B, k), entity rows (B, k),
        entity ids [[...]]), like `EntityIndex.topk`. k is clipped to K (only candidates are ranked). A slot an
        approximate search left empty has score -inf, row -1 and id None. K at least the KB size skips stage 1: the
        exact top k of `EntityIndex.topk`.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        self._check_mentions(mention_features)
        num_candidates = self.k_candidates if k_candidates is None else self._clipped_k(k_candidates, len(self.index))
        if num_candidates >= len(self.index):
            return self.index.topk(self.model, mention_features, k=k, memory_budget_bytes=self.memory_budget_bytes)
        mentions = self.model.prepare_mentions(mention_features)
        _, candidate_rows = self._stage_one(dense_mention_vectors_prepared(mentions), num_candidates)  # (B, K)
        found = candidate_rows >= 0
        # Empty slots re-score a real candidate (the mention's first) and are then set to -inf.
        filled = torch.where(found, candidate_rows, candidate_rows[:, :1].clamp(min=0))
        exact = self.index.score_prepared_candidates(self.model, mentions, filled, self.memory_budget_bytes)
        exact = exact.float().masked_fill(~found, float("-inf"))  # (B, K)
        scores, order = exact.topk(min(k, num_candidates), dim=1)
        rows = candidate_rows.gather(1, order)
        ids = [[self.index.entity_ids[r] if r >= 0 else None for r in row] for row in rows.tolist()]
        return scores, rows, ids

    @torch.no_grad()
    def candidate_recall(
        self,
        mention_features: M3ELFeatures,
        k_candidates: int | None = None,
        exact_top1_rows: torch.Tensor | None = None,
        **ranker_kwargs,
    ) -> CandidateRecall:
        """
        How often the exact top-1 entity (`EntityIndex.topk(k=1)` over the whole KB) is among the K candidates of
        stage 1. `exact_top1_rows` (B,): pass them when already known (they cost a full exact ranking);
        `ranker_kwargs` go to `EntityIndex.topk` otherwise. With ties for the top score, the entity `topk` picks
        is the one looked for.
        """
        self._check_mentions(mention_features)
        if exact_top1_rows is None:
            _, exact_top1_rows, _ = self.index.topk(self.model, mention_features, k=1, **ranker_kwargs)
        exact_top1_rows = exact_top1_rows.reshape(-1).to(self.index.device)
        num_mentions = mention_features.text_embeds.shape[0]
        if exact_top1_rows.shape[0] != num_mentions:
            raise ValueError(f"{exact_top1_rows.shape[0]} exact top-1 rows for {num_mentions} mentions")
        k = self.k_candidates if k_candidates is None else self._clipped_k(k_candidates, len(self.index))
        _, rows = self.candidates(mention_features, k)
        return CandidateRecall.of(rows, exact_top1_rows)

    # --------------------------------------------------------------------------------------------- save/load

    def save(self, folder: str | os.PathLike) -> None:
        """
        Write the stage-1 index (`entity_index.faiss`; nothing for the "torch" backend, which rebuilds from the
        entity index in seconds) and `retriever.json` into `folder`, next to the entity index's files: each written
        under a temporary name, then renamed, `retriever.json` last. It records a digest of the faiss file, of the
        entity ids, the entity index's fingerprints and its `content_id` (which encoding of the entities the vectors
        were made from), which `load` checks. The entity index may be saved before or after, and saved again: a save
        keeps its content id.
        """
        os.makedirs(folder, exist_ok=True)
        _remove_stale_saves(folder, _SAVE_PREFIX)
        meta = {
            "format": RETRIEVER_FORMAT,
            "fingerprint": self.index.fingerprint,
            "float16_fingerprint": self.index.float16_fingerprint,
            "num_entities": len(self.index),
            "entity_ids_digest": _ids_digest(self.index.entity_ids),
            "index_content_id": self.index.content_id,
            # what retrievers saved before the content id was kept checked (read by that code, not by this)
            "index_save_id": self.index.save_id,
            "dim": self.dim,
            "backend": self.backend,
            "k_candidates": self.k_candidates,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "hnsw_ef_construction": self.hnsw_ef_construction,
            "hnsw_ef_search": self.hnsw_ef_search,
        }
        with tempfile.TemporaryDirectory(dir=folder, prefix=_SAVE_PREFIX) as tmp:
            if self._faiss is not None:
                import faiss

                faiss.write_index(self._cpu_faiss(), os.path.join(tmp, RETRIEVER_FAISS))
                meta["faiss_digest"] = _file_digest(os.path.join(tmp, RETRIEVER_FAISS))
            with open(os.path.join(tmp, RETRIEVER_META), "w", encoding="utf-8") as f:
                json.dump(meta, f)
            # the faiss file first, the metadata last: a crash between the two leaves a faiss digest that does not
            # match, refused by `load`, never a silent mix
            if self._faiss is not None:
                os.replace(os.path.join(tmp, RETRIEVER_FAISS), os.path.join(folder, RETRIEVER_FAISS))
            os.replace(os.path.join(tmp, RETRIEVER_META), os.path.join(folder, RETRIEVER_META))

    @classmethod
    def load(cls, folder: str | os.PathLike, index: EntityIndex, model: M3ELModel, **overrides) -> "TwoStageRetriever":
        """
        Load a retriever saved with `save` for `index`: refused (StaleIndexError) when saved for another entity index
        (another model, other entity ids or order, or another encoding of the entities: another `content_id`), and
        (ValueError) when its files are damaged or from different saves. The same encoding saved again (to another
        folder, loaded and saved, saved by the pipeline), moved or cast to another dtype is accepted: the candidates
        are re-scored exactly on `index`. A retriever saved before the content id was kept checks the entity index's
        `save_id` it recorded against the index's content id (an index saved before it was kept has its save id as
        content id) or save id. `overrides`: constructor arguments to change, e.g. `use_gpu`, `k_candidates`,
        `nprobe`.
        """
        meta_path = os.path.join(folder, RETRIEVER_META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"no retriever in {folder}: {RETRIEVER_META} is missing")
        with open(meta_path, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                why = _one_line(error)
                raise ValueError(f"{meta_path}: not valid JSON ({why}); save the retriever again") from None
        if not isinstance(meta, dict) or meta.get("format") != RETRIEVER_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise ValueError(f"{meta_path}: retriever format {found!r}, this code reads {RETRIEVER_FORMAT}")
        names = ("backend", "k_candidates", "nlist", "nprobe", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search")
        missing = [key for key in ("fingerprint", "num_entities", *names) if key not in meta]
        if missing:
            raise ValueError(f"{meta_path}: {', '.join(missing)} missing; save the retriever again")
        rebuild = "rebuild it with TwoStageRetriever(index, model)"
        # the same model up to a half-precision load's rounding (as `EntityIndex.check_model`): either fingerprint
        same_model = meta["fingerprint"] == index.fingerprint or (
            meta.get("float16_fingerprint") is not None and meta["float16_fingerprint"] == index.float16_fingerprint
        )
        if not same_model or meta["num_entities"] != len(index):
            raise StaleIndexError(
                f"the retriever in {folder} was built for another entity index (fingerprint {meta['fingerprint']}, "
                f"{meta['num_entities']} entities); {rebuild}"
            )
        # (retrievers saved before the digest was kept: the check above alone)
        if meta.get("entity_ids_digest", _ids_digest(index.entity_ids)) != _ids_digest(index.entity_ids):
            raise StaleIndexError(
                f"the retriever in {folder} was built for another entity index (other entity ids, or another order, "
                f"for the same model); {rebuild}"
            )
        if "index_content_id" in meta:
            saved_for, accepted = meta["index_content_id"], {index.content_id}
        else:  # saved before the content id was kept: the index's save_id then (None: an index never saved)
            saved_for, accepted = meta.get("index_save_id"), {index.content_id, index.save_id}
        if saved_for is not None and saved_for not in accepted:
            raise StaleIndexError(
                f"the retriever in {folder} was built for another encoding of the entity index (content_id "
                f"{saved_for}, this index: {index.content_id}): its entities were encoded anew since (built again, "
                f"or other tensors), so the retriever's vectors may not be theirs; {rebuild}"
            )
        arguments = {key: meta[key] for key in names}
        arguments.update(overrides)
        if arguments["backend"] == meta["backend"] != "torch":
            import faiss

            faiss_path = os.path.join(folder, RETRIEVER_FAISS)
            if not os.path.exists(faiss_path):
                raise FileNotFoundError(f"no retriever in {folder}: {RETRIEVER_FAISS} is missing")
            if "faiss_digest" in meta and _file_digest(faiss_path) != meta["faiss_digest"]:
                raise ValueError(f"{folder}: {RETRIEVER_FAISS} and {RETRIEVER_META} come from different saves "
                                 f"(interrupted save?) or the faiss file is damaged; {rebuild}")
            try:
                arguments["faiss_index"] = faiss.read_index(faiss_path)
            except RuntimeError as error:
                why = _one_line(error)[:200]
                raise ValueError(f"{faiss_path}: cannot be read by faiss ({why}); {rebuild}") from None
        return cls(index, model, **arguments)


def _ids_digest(entity_ids: Sequence[str]) -> str:
    """A digest of the entity ids in their order (rows of the index)."""
    return hashlib.blake2b(json.dumps(list(entity_ids)).encode(), digest_size=16).hexdigest()


def _file_digest(path: str | os.PathLike) -> str:
    """A digest of a file's bytes, read in pieces."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while piece := f.read(2**22):
            digest.update(piece)
    return digest.hexdigest()


__all__ = [
    "CandidateRecall",
    "TwoStageRetriever",
    "dense_entity_vectors",
    "dense_mention_vectors",
    "dense_mention_vectors_prepared",
]
