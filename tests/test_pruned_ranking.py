"""Pruned exact ranking: score bounds that hold, and `rank`/`topk` with pruning equal to scoring every pair."""

import pytest
import torch

from modeling_m3el import M3ELFeatures, M3ELModel
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.tiny import tiny_config, tiny_processor

NUM_ENTITIES = 301  # not a multiple of the chunk sizes below
NUM_MENTIONS = 24

VARIANTS = [
    pytest.param({"cross_modal": "text_to_image"}, id="text_to_image"),
    pytest.param({"cross_modal": "bidirectional"}, id="bidirectional"),
    pytest.param({"use_text_matching": False}, id="no-text"),
    pytest.param({"use_image_matching": False}, id="no-image"),
    pytest.param({"use_cross_modal_matching": False}, id="no-cross-modal"),
    pytest.param({"use_text_matching": False, "use_image_matching": False}, id="cross-modal-only"),
]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def _model(processor, g2l_scale: float = 1.0, dtype=torch.float32, seed: int = 0, **overrides) -> M3ELModel:
    """A random tiny model with non-trivial LayerNorms; `g2l_scale` scales the G2L global projections (large: the
    G2L parts dominate the score and the bounds are wide)."""
    torch.manual_seed(seed)
    model = M3ELModel(tiny_config(processor, **overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and not name.startswith("clip."):
                param.add_(0.3 * torch.randn_like(param))
            if name.endswith("global_proj.weight"):
                param.mul_(g2l_scale)
    return model.to(dtype)


def _features(model: M3ELModel, count: int, generator: torch.Generator) -> M3ELFeatures:
    config = model.config
    clip = config.clip_config
    tokens = (clip.vision_config.image_size // clip.vision_config.patch_size) ** 2 + 1
    shapes = {
        "text_embeds": (clip.projection_dim,),
        "text_tokens": (config.text_max_length, clip.text_config.hidden_size),
        "image_embeds": (config.matching_dim,),
        "image_tokens": (tokens, config.matching_dim),
    }
    return M3ELFeatures(**{k: torch.randn((count, *s), generator=generator).to(model.dtype) for k, s in shapes.items()})


def _kb_and_mentions(model: M3ELModel, noise: float = 1.0, seed: int = 0, duplicates: int = 0):
    """Random entity features, and mentions that are noisy copies of their gold entities (small ranks, many close
    scores); with `duplicates`, the first gold entities get an identical twin in the KB (exact ties)."""
    generator = torch.Generator().manual_seed(seed)
    entities = _features(model, NUM_ENTITIES, generator)
    gold = torch.randperm(NUM_ENTITIES, generator=generator)[:NUM_MENTIONS]
    noise_features = _features(model, NUM_MENTIONS, generator)
    mentions = M3ELFeatures(**{k: entities[k][gold] + noise * noise_features[k] for k in entities.keys()})
    ids = [f"E{i}" for i in range(NUM_ENTITIES)]
    if duplicates:
        entities = M3ELFeatures(**{k: torch.cat([v, v[gold[:duplicates]]]) for k, v in entities.items()})
        ids += [f"twin-of-E{g}" for g in gold[:duplicates].tolist()]
    index = EntityIndex.from_features(model, entities, ids)
    return index, mentions, [ids[g] for g in gold.tolist()]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_scores_of_listed_candidates_are_the_grid_scores(processor, overrides):
    """`score_prepared(candidates=...)`: each mention's scores against its listed entity rows (-1: none) are its grid
    scores against those entities (the PyTorch path; the fused kernel's is checked in test_fused_kernel.py)."""
    model = _model(processor, **overrides)
    index, mentions, _ = _kb_and_mentions(model)
    prepared = index._on_index(model.prepare_mentions(mentions))
    entities = index._prepared(0, len(index))
    generator = torch.Generator().manual_seed(5)
    candidates = torch.randint(-1, len(index), (NUM_MENTIONS, 17), generator=generator)
    with torch.no_grad():
        grid = model.score_prepared(prepared, entities).logits
        listed = model.score_prepared(prepared, entities, candidates=candidates).logits
    assert listed.shape == candidates.shape
    present = candidates >= 0
    torch.testing.assert_close(listed[present], grid.gather(1, candidates.clamp(min=0))[present], rtol=0, atol=0)


@pytest.mark.parametrize("g2l_scale", [1.0, 30.0])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_score_bounds_hold(processor, overrides, g2l_scale):
    model = _model(processor, g2l_scale, **overrides)
    index, mentions, _ = _kb_and_mentions(model)
    with torch.no_grad():
        scores = index.scores(model, mentions)
        lower, upper = model.score_bounds(model.prepare_mentions(mentions), index._prepared(0, len(index)))
    assert lower.shape == upper.shape == scores.shape
    assert (lower <= scores).all() and (scores <= upper).all()
    if overrides.get("use_text_matching", True) or overrides.get("use_image_matching", True):
        # Not vacuous: the G2L parts move the scores by a good fraction of their bound.
        deviation = (scores - (lower + upper) / 2).abs() / ((upper - lower) / 2)
        assert deviation.max() > 0.2
    else:
        # Only dot products of vectors: the bounds are the score, up to the rounding margin.
        assert (upper - lower).max() < 1e-3 * scores.std()


def test_g2l_bound_is_the_cauchy_schwarz_bound_of_the_layer_norm(processor):
    """The bound is attained: a context whose LayerNorm output points along the entity's scaled global projection
    gives a G2L score at the upper end of the interval (to the LayerNorm's eps)."""
    model = _model(processor, dtype=torch.float64)
    block = model.text_matching
    entity = {"global": torch.randn(5, model.config.matching_dim, dtype=torch.float64)}
    center, radius = block.global_to_local_bounds(entity)
    direction = entity["global"] * block.context_norm.weight
    direction = direction - direction.mean(dim=-1, keepdim=True)
    with torch.no_grad():
        attained = (block.context_norm(1e3 * direction) * entity["global"]).sum(dim=-1)
        opposite = (block.context_norm(-1e3 * direction) * entity["global"]).sum(dim=-1)
    torch.testing.assert_close(attained, center + radius, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(opposite, center - radius, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 1, 40])
@pytest.mark.parametrize("overrides", VARIANTS)
def test_pruned_ranks_equal_full_ranks(processor, overrides, chunk_size):
    model = _model(processor, **overrides)
    index, mentions, gold = _kb_and_mentions(model)
    stats = {}
    pruned = index.rank(model, mentions, gold, chunk_size=chunk_size, stats=stats)
    full = index.rank(model, mentions, gold, prune=False)
    assert torch.equal(pruned, full)
    assert (full > 1).any() and (full == 1).any()  # the comparison is not trivial
    assert stats["pairs"] == NUM_MENTIONS * NUM_ENTITIES
    assert stats["scored"] < 0.5 * stats["pairs"]  # pruning does skip most pairs here


@pytest.mark.parametrize("g2l_scale", [1.0, 30.0])
def test_pruned_ranks_equal_full_ranks_with_wide_bounds_and_ties(processor, g2l_scale):
    # Wide bounds (G2L dominating) leave most pairs undecided; twins of gold entities tie with them exactly.
    model = _model(processor, g2l_scale, cross_modal="bidirectional")
    index, mentions, gold = _kb_and_mentions(model, duplicates=8)
    pruned = index.rank(model, mentions, gold)
    full = index.rank(model, mentions, gold, prune=False)
    assert torch.equal(pruned, full)
    assert (pruned[:8] >= 2).all()  # each twin counts against its gold


def test_pruned_ranks_one_mention_and_float64(processor):
    model = _model(processor, dtype=torch.float64, cross_modal="bidirectional")
    index, mentions, gold = _kb_and_mentions(model)
    assert index.dtype == torch.float64
    assert torch.equal(index.rank(model, mentions, gold), index.rank(model, mentions, gold, prune=False))
    one = M3ELFeatures(**{k: v[3:4] for k, v in mentions.items()})
    assert torch.equal(index.rank(model, one, gold[3:4]), index.rank(model, one, gold[3:4], prune=False))


@pytest.mark.parametrize("k", [1, 5, NUM_ENTITIES, NUM_ENTITIES + 3])
@pytest.mark.parametrize("overrides", VARIANTS[:2] + VARIANTS[5:])
def test_pruned_topk_equals_full_topk(processor, overrides, k):
    model = _model(processor, **overrides)
    index, mentions, _ = _kb_and_mentions(model)
    stats = {}
    values, rows, ids = index.topk(model, mentions, k=k, chunk_size=50, stats=stats)
    full_values, full_rows, full_ids = index.topk(model, mentions, k=k, prune=False)
    assert values.shape == full_values.shape == (NUM_MENTIONS, min(k, NUM_ENTITIES))
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, full_rows) and ids == full_ids
    if k == 1:
        assert stats["scored"] < 0.5 * stats["pairs"]


def test_pruned_topk_with_wide_bounds(processor):
    model = _model(processor, 30.0)
    index, mentions, _ = _kb_and_mentions(model, noise=3.0)
    values, rows, _ = index.topk(model, mentions, k=7)
    full_values, full_rows, _ = index.topk(model, mentions, k=7, prune=False)
    torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, full_rows)


def test_pruned_ranks_of_a_bfloat16_index(processor):
    # Half precision: the bounds carry a margin of a few units of bfloat16's last place, so pruning decides only
    # what the bfloat16 scores would decide too (exact equality is not promised: rounding differs between paths).
    model = _model(processor)
    index, mentions, gold = _kb_and_mentions(model)
    half = index.to(dtype=torch.bfloat16)
    pruned = half.rank(model, mentions, gold)
    full = half.rank(model, mentions, gold, prune=False)
    assert (pruned == full).float().mean() >= 0.9
    assert abs((1 / pruned.double()).mean() - (1 / full.double()).mean()) < 0.02
    float32 = index.rank(model, mentions, gold)
    assert abs((1 / pruned.double()).mean() - (1 / float32.double()).mean()) < 0.05


@pytest.mark.parametrize("prune", [True, False])
def test_nan_features_are_refused_by_name(processor, prune):
    model = _model(processor)
    index, mentions, gold = _kb_and_mentions(model)
    broken = M3ELFeatures(**{k: v.clone() for k, v in mentions.items()})
    broken.text_embeds[2] = float("nan")
    with pytest.raises(ValueError, match=r"is NaN for mention\(s\) \[2\]"):
        index.rank(model, broken, gold, prune=prune)
    if prune:
        with pytest.raises(ValueError, match=r"is NaN for mention\(s\) \[2\]"):
            index.topk(model, broken, k=3)
