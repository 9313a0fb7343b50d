"""Candidate scoring and two-stage retrieval: candidate scores are the all-pairs scores, the dense vectors are the
score minus its G2L parts, and two-stage retrieval with K = the KB size is exact ranking."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_m3el import M3ELFeatures, M3ELModel
from modeling_m3el.index_m3el import EntityIndex, StaleIndexError
from modeling_m3el.retrieval import (
    RETRIEVER_FAISS,
    CandidateRecall,
    RETRIEVER_META,
    TwoStageRetriever,
    dense_entity_vectors,
    dense_mention_vectors,
)
from modeling_m3el.tiny import tiny_config, tiny_processor

MODES = ("text_to_image", "bidirectional")
NUM_ENTITIES = 37  # not a multiple of anything used below
BRANCH_LOGITS = ("logits", "text_logits", "image_logits", "text_to_image_logits", "image_to_text_logits")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(words=("river", "bank", "city"))


def _model(processor, mode, seed=0, **overrides):
    torch.manual_seed(seed)
    model = M3ELModel(tiny_config(processor, cross_modal=mode, **overrides)).eval()
    with torch.no_grad():  # LayerNorms away from their identity initialisation, so that they matter
        for name, param in model.named_parameters():
            if "norm" in name and not name.startswith("clip."):
                param.add_(0.2 * torch.randn_like(param))
    return model


def _features(model, count, seed, dtype=torch.float32) -> M3ELFeatures:
    """Random features of the shapes `model.encode` makes (the scores do not care where features come from)."""
    config = model.config
    vision = config.clip_config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return M3ELFeatures(
        text_embeds=randn(count, config.clip_config.projection_dim),
        text_tokens=randn(count, config.text_max_length, config.clip_config.text_config.hidden_size),
        image_embeds=randn(count, config.matching_dim),
        image_tokens=randn(count, tokens, config.matching_dim),
    )


def _kb(model, count=NUM_ENTITIES, seed=0, dtype=torch.float32):
    features = _features(model, count, seed, dtype)
    return features, EntityIndex.from_features(model, features, [f"Q{i}" for i in range(count)])


def _candidate_rows(num_mentions, num_candidates, num_entities, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, num_entities, (num_mentions, num_candidates), generator=generator)
    rows[0, : min(2, num_candidates)] = 5  # the same entity twice among one mention's candidates
    return rows


# ------------------------------------------------------------------------------------------ candidate scoring


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_candidate_scores_equal_all_pairs(processor, mode, dtype, tolerance):
    model = _model(processor, mode).to(dtype)
    entities, mentions = _features(model, NUM_ENTITIES, 0, dtype), _features(model, 4, 1, dtype)
    with torch.no_grad():
        prepared_mentions, prepared_entities = model.prepare_mentions(mentions), model.prepare_entities(entities)
        all_pairs = model.score_prepared(prepared_mentions, prepared_entities)
        for num_candidates in (1, 6, NUM_ENTITIES):
            rows = _candidate_rows(4, num_candidates, NUM_ENTITIES)
            gathered = {b: {k: t[rows] for k, t in part.items()} for b, part in prepared_entities.items()}
            candidates = model.score_prepared_candidates(prepared_mentions, gathered)
            for name in BRANCH_LOGITS:
                expected, got = getattr(all_pairs, name), getattr(candidates, name)
                if expected is None:
                    assert got is None
                    continue
                assert got.shape == (4, num_candidates) and got.dtype == dtype
                torch.testing.assert_close(got, expected.gather(1, rows), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("memory_budget_bytes", [1, 50_000, 2**30])  # per candidate, per mention group, all at once
def test_index_score_candidates_equal_index_scores(processor, mode, memory_budget_bytes):
    model = _model(processor, mode)
    _, index = _kb(model)
    mentions = _features(model, 5, 1)
    scores = index.scores(model, mentions)
    rows = _candidate_rows(5, 9, NUM_ENTITIES)
    candidates = index.score_candidates(model, mentions, rows, memory_budget_bytes=memory_budget_bytes)
    torch.testing.assert_close(candidates, scores.gather(1, rows), rtol=1e-5, atol=1e-5)
    # One mention alone, one candidate.
    single = index.score_candidates(model, M3ELFeatures(**{k: v[2:3] for k, v in mentions.items()}), rows[2:3, 4:5])
    torch.testing.assert_close(single, scores[2:3].gather(1, rows[2:3, 4:5]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_index_runs_each_layer_norm_in_one_dtype(processor, dtype, monkeypatch):
    # CUDA's LayerNorm refuses an input whose dtype differs from its parameters' (CPU's accepts it): a half-precision
    # index scored by a float32 model must not depend on the CPU's leniency, in both scoring paths.
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 3, 1)
    layer_norm = torch.nn.functional.layer_norm

    def strict_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        assert weight is None or x.dtype == weight.dtype, f"LayerNorm of {x.dtype} with {weight.dtype} parameters"
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(torch.nn.functional, "layer_norm", strict_layer_norm)
    half = index.to(dtype=dtype)
    scores = half.scores(model, mentions)
    assert scores.dtype == torch.float32  # half-precision tensors, float32 scores
    rows = _candidate_rows(3, 5, NUM_ENTITIES)
    candidates = half.score_candidates(model, mentions, rows)
    # both paths compute in float32 after the half-precision attention products: they agree to float32's rounding
    torch.testing.assert_close(candidates, scores.gather(1, rows), rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    torch.testing.assert_close(scores, index.scores(model, mentions), rtol=0, atol=0.05)


def test_candidate_scoring_errors(processor):
    model = _model(processor, "text_to_image")
    _, index = _kb(model)
    mentions = _features(model, 3, 1)
    with pytest.raises(ValueError, match="a batch of 0"):
        index.score_candidates(model, M3ELFeatures(**{k: v[:0] for k, v in mentions.items()}), torch.zeros(0, 2).long())
    with pytest.raises(ValueError, match=r"shape \(3, K\)"):
        index.score_candidates(model, mentions, torch.zeros(2, 4).long())
    with pytest.raises(ValueError, match="K >= 1"):
        index.score_candidates(model, mentions, torch.zeros(3, 0).long())
    with pytest.raises(TypeError, match="LongTensor"):
        index.score_candidates(model, mentions, torch.zeros(3, 4))
    with pytest.raises(IndexError, match=r"\[0, 37\)"):
        index.score_candidates(model, mentions, torch.full((3, 4), NUM_ENTITIES))
    prepared = model.prepare_mentions(mentions)
    with pytest.raises(ValueError, match="gathered per mention"):
        model.score_prepared_candidates(prepared, index._prepared(0, 5))  # (E, ...) tensors, not (B, K, ...)


def test_from_inputs_equals_build(processor):
    model = _model(processor, "bidirectional")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)) if i % 3 else None for i in range(7)]
    kb = [{"id": f"Q{i}", "name": f"city {i}", "description": "river bank", "image": images[i]} for i in range(7)]
    built = EntityIndex.build(model, processor, kb, batch_size=3, progress=False)
    inputs = processor.process_entities([e["name"] for e in kb], [e["description"] for e in kb], images)
    from_inputs = EntityIndex.from_inputs(model, inputs, [e["id"] for e in kb], batch_size=2)
    assert from_inputs.entity_ids == built.entity_ids and from_inputs.fingerprint == built.fingerprint
    for name, tensor in built.tensors.items():
        torch.testing.assert_close(from_inputs.tensors[name], tensor, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="empty KB"):
        EntityIndex.from_inputs(model, inputs, [])
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] holds 7 entities, entity_ids 8"):
        EntityIndex.from_inputs(model, inputs, [e["id"] for e in kb] + ["Q7"])


# ---------------------------------------------------------------------------------------------- dense vectors


def _global_to_local_part(model, mentions, entities):
    """(g2l_text / 2 + g2l_image / 2) / num_branches, from the model's intra-modal blocks."""
    prepared_mentions, prepared_entities = model.prepare_mentions(mentions), model.prepare_entities(entities)
    part = 0.0
    for name, block in (("text", model.text_matching), ("image", model.image_matching)):
        if block is not None:
            part = part + block.global_to_local(prepared_mentions[name], prepared_entities[name]) / 2
    return part / len(model.config.branches)


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("text_to_image", {}),
        ("bidirectional", {}),
        ("bidirectional", {"use_text_matching": False}),
        ("text_to_image", {"use_image_matching": False, "use_cross_modal_matching": False}),
    ],
)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float64, 1e-6)])
def test_dense_dot_product_is_the_score_with_global_to_local_at_its_centre(processor, mode, overrides, dtype,
                                                                          tolerance):
    model = _model(processor, mode, **overrides).to(dtype)
    entities, index = _kb(model, dtype=dtype)
    mentions = _features(model, 6, 1, dtype)
    with torch.no_grad():
        scores = model.score(mentions, entities)
        prepared_entities = model.prepare_entities(entities)
        centres = sum(entities_global @ block.context_norm.bias for entities_global, block in [
            (prepared_entities[name]["global"], block) for name, block in model._intra_modal_blocks()
        ]) if model._intra_modal_blocks() else 0.0
        centre_part = centres / 2 / len(model.config.branches)
        expected = scores.logits - _global_to_local_part(model, mentions, entities) + centre_part
        dense = dense_mention_vectors(model, mentions) @ dense_entity_vectors(index, model).T
        estimate = model.score_estimate(model.prepare_mentions(mentions), index._prepared(0, len(index)))
    # The dense vectors are float32 (what faiss takes), so float64 models agree to float32 precision.
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense.to(dtype), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(dense.to(dtype), estimate.to(dtype), rtol=tolerance, atol=tolerance)
    if model._intra_modal_blocks():  # the centres are not vacuous here (the test's LayerNorm biases are not 0)
        assert float(torch.as_tensor(centre_part).abs().max()) > 10 * tolerance
    # And, branch by branch, the dense part is G2G halves plus the cross-modal scores, averaged over branches.
    dense = dense - torch.as_tensor(centre_part).to(dense)
    expected_from_branches = 0.0
    g2l = {}
    with torch.no_grad():
        prepared_mentions, prepared_entities = model.prepare_mentions(mentions), model.prepare_entities(entities)
        for name, block in (("text", model.text_matching), ("image", model.image_matching)):
            if block is not None:
                g2l[name] = block.global_to_local(prepared_mentions[name], prepared_entities[name])
    for name in ("text", "image"):
        if name in g2l:
            expected_from_branches = expected_from_branches + getattr(scores, f"{name}_logits") - g2l[name] / 2
    for name in ("text_to_image", "image_to_text"):
        if getattr(scores, f"{name}_logits") is not None:
            expected_from_branches = expected_from_branches + getattr(scores, f"{name}_logits")
    expected_from_branches = expected_from_branches / len(model.config.branches)
    torch.testing.assert_close(dense.to(dtype), expected_from_branches, rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------------------------ two-stage retrieval

EXHAUSTIVE = {
    "flat": {},
    "ivf": {"nlist": 4, "nprobe": 4},  # every cell searched
    "hnsw": {"hnsw_m": 8, "hnsw_ef_search": NUM_ENTITIES},  # a search breadth of the whole KB visits every entity
    "torch": {},
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", list(EXHAUSTIVE))
def test_two_stage_with_k_the_kb_size_is_exact_ranking(processor, mode, backend):
    model = _model(processor, mode)
    _, index = _kb(model)
    mentions = _features(model, 6, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=NUM_ENTITIES, backend=backend, **EXHAUSTIVE[backend])
    expected_scores, expected_rows, expected_ids = index.topk(model, mentions, k=10)
    scores, rows, ids = retriever.search(mentions, k=10)
    assert torch.equal(rows, expected_rows) and ids == expected_ids
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    # The whole ranking, not only its head.
    scores, rows, _ = retriever.search(mentions, k=NUM_ENTITIES)
    exact = index.scores(model, mentions)
    assert torch.equal(rows, exact.topk(NUM_ENTITIES, dim=1).indices)
    assert retriever.candidate_recall(mentions).recall == 1.0


def test_recall_report_counts_the_exact_top1_among_the_candidates(processor):
    model = _model(processor, "text_to_image")
    _, index = _kb(model)
    mentions = _features(model, 3, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=4)
    _, candidates = retriever.candidates(mentions)
    assert candidates.shape == (3, 4)
    outside = next(r for r in range(NUM_ENTITIES) if r not in candidates[2].tolist())
    # Exact top-1 rows made up: the first candidate, the last (K-th) candidate, and an entity outside the K.
    made_up = torch.tensor([candidates[0, 0], candidates[1, 3], outside])
    report = retriever.candidate_recall(mentions, exact_top1_rows=made_up)
    assert (report.hits, report.count, report.k_candidates) == (2, 3, 4)
    assert report.recall == pytest.approx(2 / 3)
    assert report.found.tolist() == [True, True, False]


def test_recall_against_brute_force_when_global_to_local_dominates(processor):
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    # Entity-side G2L projections scaled up: the exact order now follows G2L, which stage 1 does not see.
    index.tensors["text.global"] = index.tensors["text.global"] * 10
    mentions = _features(model, 24, 1)
    exact_top1 = index.scores(model, mentions).argmax(dim=1)
    dense = dense_mention_vectors(model, mentions) @ dense_entity_vectors(index, model).T
    recalls = []
    for k in (1, 5, 20, NUM_ENTITIES):
        brute = (dense.topk(k, dim=1).indices == exact_top1[:, None]).any(dim=1)
        report = TwoStageRetriever(index, model, k_candidates=k, check_model=False).candidate_recall(mentions)
        assert report.found.tolist() == brute.tolist()
        assert report.recall == pytest.approx(brute.float().mean().item())
        recalls.append(report.recall)
    assert 0 < recalls[0] < recalls[1] < recalls[2] < recalls[3] == 1.0  # a case where K matters


def test_two_stage_finds_the_top_entities_of_the_candidates(processor):
    # With K < E the result is the exact ranking of the K candidates the first stage returned.
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 5, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=8, backend="torch")
    _, candidates = retriever.candidates(mentions)
    exact = index.scores(model, mentions).gather(1, candidates)
    scores, rows, _ = retriever.search(mentions, k=3)
    torch.testing.assert_close(scores, exact.topk(3, dim=1).values, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, candidates.gather(1, exact.topk(3, dim=1).indices))
    assert retriever.search(mentions, k=50)[0].shape == (5, 8)  # k clipped to K


def test_retrieval_errors(processor):
    model = _model(processor, "text_to_image")
    _, index = _kb(model)
    mentions = _features(model, 3, 1)
    no_mentions = M3ELFeatures(**{k: v[:0] for k, v in mentions.items()})
    empty = EntityIndex.__new__(EntityIndex)  # EntityIndex itself refuses 0 entities; the retriever checks again
    empty.tensors, empty.entity_ids, empty.fingerprint = {k: v[:0] for k, v in index.tensors.items()}, [], ""
    with pytest.raises(ValueError, match="empty KB"):
        TwoStageRetriever(empty, model)
    for k in (0, -3):
        with pytest.raises(ValueError, match="k_candidates must be positive"):
            TwoStageRetriever(index, model, k_candidates=k)
    with pytest.raises(ValueError, match="unknown backend 'annoy'"):
        TwoStageRetriever(index, model, backend="annoy")
    retriever = TwoStageRetriever(index, model, k_candidates=10**6)
    assert retriever.k_candidates == NUM_ENTITIES  # K beyond the KB: the whole KB
    for call in (retriever.search, retriever.candidates, retriever.candidate_recall):
        with pytest.raises(ValueError, match="a batch of 0"):
            call(no_mentions)
    with pytest.raises(ValueError, match="k must be positive"):
        retriever.search(mentions, k=0)
    with pytest.raises(ValueError, match="k_candidates must be positive"):
        retriever.candidates(mentions, k_candidates=0)
    other = _model(processor, "text_to_image", seed=1)
    with pytest.raises(StaleIndexError):
        TwoStageRetriever(index, other)


def test_use_gpu_without_faiss_gpu_warns_and_searches_on_cpu(processor):
    faiss = pytest.importorskip("faiss")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss sees a GPU here")
    model = _model(processor, "text_to_image")
    _, index = _kb(model)
    with pytest.warns(UserWarning, match="no GPU support"):
        retriever = TwoStageRetriever(index, model, k_candidates=NUM_ENTITIES, use_gpu=True)
    mentions = _features(model, 2, 1)
    assert torch.equal(retriever.search(mentions, k=5)[1], index.topk(model, mentions, k=5)[1])


@pytest.mark.parametrize("backend", ["ivf", "torch"])
def test_save_load_round_trip(processor, tmp_path, backend):
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 4, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6, backend=backend, nlist=5, nprobe=2)
    index.save(tmp_path)
    retriever.save(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert RETRIEVER_META in files and (RETRIEVER_FAISS in files) == (backend != "torch")
    loaded = TwoStageRetriever.load(tmp_path, EntityIndex.load(tmp_path, model), model)
    assert (loaded.backend, loaded.k_candidates, loaded.nlist, loaded.nprobe) == (backend, 6, 5, 2)
    assert torch.equal(loaded.candidates(mentions)[1], retriever.candidates(mentions)[1])
    assert torch.equal(loaded.search(mentions, k=3)[1], retriever.search(mentions, k=3)[1])
    # A retriever saved for another index (another model: both fingerprints differ) is refused.
    meta = json.loads((tmp_path / RETRIEVER_META).read_text())
    (tmp_path / RETRIEVER_META).write_text(json.dumps(dict(meta, fingerprint="0" * 32, float16_fingerprint="1" * 32)))
    with pytest.raises(StaleIndexError, match="another entity index"):
        TwoStageRetriever.load(tmp_path, index, model)
    # One saved by the code before the G2L centres' column (format 1) is refused: its vectors lack it.
    (tmp_path / RETRIEVER_META).write_text(json.dumps(dict(meta, format=1)))
    with pytest.raises(ValueError, match="retriever format 1, this code reads 2"):
        TwoStageRetriever.load(tmp_path, index, model)


@pytest.mark.parametrize("backend", ["flat", "torch"])
def test_a_retriever_for_other_entities_is_refused(processor, tmp_path, backend):
    """A retriever saved for one KB, loaded against an index of the same model and size whose entities are others or
    in another order (its rows would name the wrong entities), or against a new encoding of the KB: refused."""
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    index.save(tmp_path)
    TwoStageRetriever(index, model, k_candidates=5, backend=backend).save(tmp_path)
    meta = json.loads((tmp_path / RETRIEVER_META).read_text())
    assert meta["index_content_id"] == index.content_id == EntityIndex.load(tmp_path).content_id
    TwoStageRetriever.load(tmp_path, EntityIndex.load(tmp_path, model), model)
    reordered = index.select(index.entity_ids[::-1])  # same model, same size
    renamed = EntityIndex(index.tensors, [f"P{i}" for i in range(NUM_ENTITIES)], index.fingerprint)
    for other in (reordered, renamed):
        assert (other.fingerprint, len(other)) == (index.fingerprint, len(index))
        with pytest.raises(StaleIndexError, match="other entity ids, or another order"):
            TwoStageRetriever.load(tmp_path, other, model)
    # the KB encoded anew (the same ids, the same model) and saved in its place: the retriever's vectors may be stale
    EntityIndex.from_features(model, _features(model, NUM_ENTITIES, 0), index.entity_ids).save(tmp_path)
    with pytest.raises(StaleIndexError, match="another encoding of the entity index"):
        TwoStageRetriever.load(tmp_path, EntityIndex.load(tmp_path, model), model)
    # a retriever saved before the ids' digest was kept: the fingerprint and size alone, as before
    old = ("entity_ids_digest", "index_save_id", "index_content_id", "float16_fingerprint")
    (tmp_path / RETRIEVER_META).write_text(json.dumps({k: v for k, v in meta.items() if k not in old}))
    assert TwoStageRetriever.load(tmp_path, reordered, model).index is reordered



@pytest.mark.parametrize("backend", ["flat", "torch"])
def test_a_retriever_survives_re_saves_and_casts_of_its_index_but_not_a_new_encoding(processor, tmp_path, backend):
    """The retriever checks which encoding of the entities it was built on (the index's content id), not which save
    of the index files: the index saved again elsewhere, loaded and saved again in place, or cast, still serves it, with
    the same candidates; the same KB encoded again, even by the same model into equal tensors, is refused."""
    model = _model(processor, "bidirectional")
    features, index = _kb(model)
    mentions = _features(model, 5, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6, backend=backend)
    retriever.save(tmp_path / "a")  # before the index: it has no save yet
    index.save(tmp_path / "a")
    candidates, (_, rows, ids) = retriever.candidates(mentions)[1], retriever.search(mentions, k=3)
    EntityIndex.load(tmp_path / "a", model).save(tmp_path / "b")
    resaved = EntityIndex.load(tmp_path / "a", model)
    resaved.save(tmp_path / "a")
    resaved.save(tmp_path / "a")
    for other in (EntityIndex.load(tmp_path / "b", model), EntityIndex.load(tmp_path / "a", model), index, resaved):
        assert other.save_id != index.save_id or other is index
        loaded = TwoStageRetriever.load(tmp_path / "a", other, model)
        assert torch.equal(loaded.candidates(mentions)[1], candidates)
        _, loaded_rows, loaded_ids = loaded.search(mentions, k=3)
        assert torch.equal(loaded_rows, rows) and loaded_ids == ids
    # cast: accepted; its candidates are the saved stage 1's (the faiss file), or the cast index's (torch: rebuilt)
    cast = EntityIndex.load(tmp_path / "b", model, dtype=torch.bfloat16)
    loaded = TwoStageRetriever.load(tmp_path / "a", cast, model)
    built = retriever if backend != "torch" else TwoStageRetriever(cast, model, k_candidates=6, backend=backend)
    assert torch.equal(loaded.candidates(mentions)[1], built.candidates(mentions)[1])
    # a new encoding of the same KB with the same model: equal tensors, but refused (nothing proves them equal)
    again = EntityIndex.from_features(model, features, index.entity_ids)
    assert all(torch.equal(again.tensors[name], tensor) for name, tensor in index.tensors.items())
    for other in (again, EntityIndex.from_features(model, _features(model, NUM_ENTITIES, 5), index.entity_ids)):
        with pytest.raises(StaleIndexError, match="another encoding of the entity index .* rebuild it with "
                                                  r"TwoStageRetriever\(index, model\)") as caught:
            TwoStageRetriever.load(tmp_path / "a", other, model)
        assert other.content_id in str(caught.value) and index.content_id in str(caught.value)
    again.save(tmp_path / "b")
    with pytest.raises(StaleIndexError, match="another encoding of the entity index"):
        TwoStageRetriever.load(tmp_path / "a", EntityIndex.load(tmp_path / "b", model), model)


def test_a_retriever_serves_the_index_its_pipeline_saved_in_float16(processor, tmp_path):
    """The pipeline saves its index in the model's half precision, stamped with the half-precision checkpoint's
    fingerprints (a bfloat16 rounding of float16 weights differs from the weights' own): the same encoding, cast, so
    the retriever saved beside the float32 index still loads with it, with the same candidates."""
    from modeling_m3el.pipeline_m3el import M3ELEntityLinkingPipeline

    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 5, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6)
    index.save(tmp_path / "index")
    retriever.save(tmp_path / "index")
    half = _model(processor, "bidirectional").to(torch.float16)
    linker = M3ELEntityLinkingPipeline(model=half, processor=processor, index=str(tmp_path / "index"), device="cpu")
    linker.save_pretrained(tmp_path / "pipeline")
    saved = EntityIndex.load(tmp_path / "pipeline", model)
    assert saved.dtype == torch.float16 and saved.fingerprint != index.fingerprint  # re-stamped
    assert saved.content_id == index.content_id and saved.save_id != index.save_id
    loaded = TwoStageRetriever.load(tmp_path / "index", saved, model)
    candidates = retriever.candidates(mentions)[1]
    assert torch.equal(loaded.candidates(mentions)[1], candidates)
    # re-scored exactly on the index given (float16 here): the best 3 of those candidates by its scores
    scores, rows, _ = loaded.search(mentions, k=3)
    exact = saved.score_candidates(model, mentions, candidates).float()
    assert torch.equal(rows, candidates.gather(1, exact.topk(3, dim=1).indices))
    # the same from the pipeline's folder, with the half-precision model
    TwoStageRetriever.load(tmp_path / "index", EntityIndex.load(tmp_path / "pipeline", half), half)


def _as_saved_before_the_content_id(folder):
    """Rewrite an index's and a retriever's files in `folder` as the code before the content id wrote them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from modeling_m3el.index_m3el import INDEX_META, INDEX_WEIGHTS

    meta = json.loads((folder / INDEX_META).read_text())
    del meta["content_id"]
    (folder / INDEX_META).write_text(json.dumps(meta))
    with safe_open(str(folder / INDEX_WEIGHTS), framework="pt") as f:
        stamp = {k: v for k, v in f.metadata().items() if k != "content_id"}
    save_file(load_file(folder / INDEX_WEIGHTS), folder / INDEX_WEIGHTS, metadata=stamp)
    retriever = json.loads((folder / RETRIEVER_META).read_text())
    del retriever["index_content_id"], retriever["float16_fingerprint"]
    assert retriever["index_save_id"] == meta["save_id"] is not None
    (folder / RETRIEVER_META).write_text(json.dumps(retriever))
    return retriever


def test_an_index_and_a_retriever_saved_before_the_content_id_still_work_together(processor, tmp_path):
    """Files without content ids: the retriever recorded the index's save id, which is the old index's content id;
    re-saved by this code, that index keeps it, so the old retriever now survives the re-save too."""
    model = _model(processor, "bidirectional")
    features, index = _kb(model)
    mentions = _features(model, 5, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6)
    index.save(tmp_path / "old")
    retriever.save(tmp_path / "old")
    meta = _as_saved_before_the_content_id(tmp_path / "old")
    old = EntityIndex.load(tmp_path / "old", model)
    assert old.content_id == old.save_id == meta["index_save_id"]
    candidates = retriever.candidates(mentions)[1]
    assert torch.equal(TwoStageRetriever.load(tmp_path / "old", old, model).candidates(mentions)[1], candidates)
    old.save(tmp_path / "new")  # re-saved by this code: a new save id, the old one as content id
    new = EntityIndex.load(tmp_path / "new", model)
    assert new.save_id != meta["index_save_id"] == new.content_id
    assert torch.equal(TwoStageRetriever.load(tmp_path / "old", new, model).candidates(mentions)[1], candidates)
    # a retriever saved by this code with the old index: its content id recorded, kept by the re-save
    TwoStageRetriever.load(tmp_path / "old", old, model).save(tmp_path / "new")
    TwoStageRetriever.load(tmp_path / "new", new, model)
    # refused still: a new encoding of the KB, for the old retriever too
    again = EntityIndex.from_features(model, features, index.entity_ids)
    with pytest.raises(StaleIndexError, match="another encoding of the entity index"):
        TwoStageRetriever.load(tmp_path / "old", again, model)
    # an old retriever saved with an index never saved (no save id recorded) checks no content, as before
    (tmp_path / RETRIEVER_META).write_text(json.dumps(dict(meta, index_save_id=None)))
    (tmp_path / RETRIEVER_FAISS).write_bytes((tmp_path / "old" / RETRIEVER_FAISS).read_bytes())
    TwoStageRetriever.load(tmp_path, again, model)

def test_retriever_save_is_atomic_and_damaged_files_are_one_line_errors(processor, tmp_path):
    """Both files are written under temporary names and renamed, retriever.json last: a crash between the two renames
    leaves a faiss file whose digest retriever.json does not have, refused; so is a truncated faiss file or JSON."""
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 4, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6, backend="ivf", nlist=5, nprobe=2)
    retriever.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [RETRIEVER_FAISS, RETRIEVER_META]  # no temporaries
    TwoStageRetriever(index, model, k_candidates=6, backend="ivf", nlist=7, nprobe=7).save(tmp_path / "b")
    faiss_a = (tmp_path / "a" / RETRIEVER_FAISS).read_bytes()
    (tmp_path / "a" / RETRIEVER_FAISS).write_bytes((tmp_path / "b" / RETRIEVER_FAISS).read_bytes())  # the crash
    with pytest.raises(ValueError, match="come from different saves .* or the faiss file is damaged"):
        TwoStageRetriever.load(tmp_path / "a", index, model)
    (tmp_path / "a" / RETRIEVER_FAISS).write_bytes(faiss_a[: len(faiss_a) // 2])
    with pytest.raises(ValueError, match="come from different saves"):
        TwoStageRetriever.load(tmp_path / "a", index, model)
    meta = json.loads((tmp_path / "a" / RETRIEVER_META).read_text())
    (tmp_path / "a" / RETRIEVER_META).write_text(json.dumps({k: v for k, v in meta.items() if k != "faiss_digest"}))
    with pytest.raises(ValueError, match="entity_index.faiss: cannot be read by faiss") as caught:  # no digest to check
        TwoStageRetriever.load(tmp_path / "a", index, model)
    assert "\n" not in str(caught.value)
    (tmp_path / "a" / RETRIEVER_FAISS).write_bytes(faiss_a)
    loaded = TwoStageRetriever.load(tmp_path / "a", index, model)
    assert torch.equal(loaded.candidates(mentions)[1], retriever.candidates(mentions)[1])
    (tmp_path / "a" / RETRIEVER_FAISS).unlink()
    with pytest.raises(FileNotFoundError, match="entity_index.faiss is missing"):
        TwoStageRetriever.load(tmp_path / "a", index, model)
    (tmp_path / "a" / RETRIEVER_META).write_text('{"format": 2, "fing')
    with pytest.raises(ValueError, match="retriever.json: not valid JSON"):
        TwoStageRetriever.load(tmp_path / "a", index, model)


def test_k_the_kb_size_is_exact_with_an_approximate_search_too(processor):
    """IVF searching nprobe < nlist cells (the default nlist // 8), HNSW with a narrow search: K = the KB size still
    gives every entity as a candidate, and the exact top k."""
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 6, 1)
    expected_scores, expected_rows, expected_ids = index.topk(model, mentions, k=10)
    dense = dense_mention_vectors(model, mentions) @ dense_entity_vectors(index, model).T
    for backend, options in (("ivf", {}), ("hnsw", {"hnsw_m": 4, "hnsw_ef_search": 1})):
        retriever = TwoStageRetriever(index, model, k_candidates=NUM_ENTITIES, backend=backend, **options)
        assert backend != "ivf" or retriever.nprobe < retriever.nlist
        scores, rows = retriever.candidates(mentions)
        assert (rows >= 0).all() and [sorted(r) for r in rows.tolist()] == [list(range(NUM_ENTITIES))] * 6
        torch.testing.assert_close(scores, dense.topk(NUM_ENTITIES, dim=1).values, rtol=1e-5, atol=1e-5)
        scores, rows, ids = retriever.search(mentions, k=10)
        assert torch.equal(rows, expected_rows) and ids == expected_ids
        torch.testing.assert_close(scores, expected_scores)
        assert retriever.candidate_recall(mentions).recall == 1.0
        # fewer candidates than the KB: the approximate search itself (empty slots possible)
        assert retriever.candidates(mentions, k_candidates=5)[1].shape == (6, 5)


def test_candidate_recall_repr_leaves_out_the_per_mention_tensor():
    report = CandidateRecall.of(torch.tensor([[0, 1], [2, 3], [4, 5]]), torch.tensor([1, 0, 4]))
    assert (report.hits, report.count, report.found.tolist()) == (2, 3, [True, False, True])
    assert repr(report) == "CandidateRecall(recall=0.6666666666666666, hits=2, count=3, k_candidates=2)"


@pytest.mark.parametrize("backend", ["flat", "torch"])
def test_exhaustive_stage_one_picks_the_candidates_of_topk(processor, backend):
    """An exhaustive stage 1 searches `score_estimate`, as `EntityIndex.topk(candidates=K)` does: the same K."""
    model = _model(processor, "bidirectional")
    _, index = _kb(model)
    mentions = _features(model, 8, 1)
    retriever = TwoStageRetriever(index, model, k_candidates=6, backend=backend)
    rows = retriever.candidates(mentions)[1]
    _, topk_rows, _ = index.topk(model, mentions, k=6, candidates=6)
    assert [sorted(r) for r in rows.tolist()] == [sorted(r) for r in topk_rows.tolist()]
    values, found, _ = retriever.search(mentions, k=3)
    expected_values, expected, _ = index.topk(model, mentions, k=3, candidates=6)
    assert torch.equal(found, expected)
    torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
