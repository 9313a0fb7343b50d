"""Pruned exact ranking: score bounds that hold, and `rank`/`topk` with pruning equal to scoring every pair."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_m3el import M3ELFeatures, M3ELModel
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.tiny import tiny_config, tiny_processor

ROOT = Path(__file__).resolve().parent.parent

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
    with torch.no_grad():
        grid = model.score_prepared(prepared, entities).logits
    # the dot-product parts: gathered rows for few candidates (K * D < E), every pair then picked for many; the
    # gathered products are batched, so they may differ from the grid's in the last bit
    for count in (2, 17, 40):
        candidates = torch.randint(-1, len(index), (NUM_MENTIONS, count), generator=generator)
        with torch.no_grad():
            listed = model.score_prepared(prepared, entities, candidates=candidates).logits
        assert listed.shape == candidates.shape
        present = candidates >= 0
        expected = grid.gather(1, candidates.clamp(min=0))[present]
        torch.testing.assert_close(listed[present], expected, rtol=1e-6, atol=1e-6 * float(grid.abs().max()))


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


WIDE = {"matching_dim": 64}  # more channels than tokens (40 text, 17 image), as at B/32 sizes (d 96; 40 and 50)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("g2l_scale", [1.0, 30.0])
def test_mention_dependent_g2l_bounds_hold_and_are_tighter(processor, dtype, g2l_scale):
    """With fewer mention tokens than channels, a mention's centred contexts span fewer dimensions than d: the
    bound of each (mention, entity) pair (the projection of the entity's vector on that span) holds for the scores
    as computed, and is narrower than the bound for any mention."""
    model = _model(processor, g2l_scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32, **WIDE)
    index, mentions, gold = _kb_and_mentions(model)
    index = index.to(dtype=dtype)
    with torch.no_grad():
        prepared = index._on_index(model.prepare_mentions(mentions))
        entities = index._prepared(0, len(index))
        spans = model.mention_spans(prepared)
        assert spans["text"]["basis"].shape == (NUM_MENTIONS, 64, 40)
        assert spans["image"]["basis"].shape == (NUM_MENTIONS, 64, 17)
        for name, block in (("text", model.text_matching), ("image", model.image_matching)):
            g2l = block.global_to_local(prepared[name], entities[name]).double()
            center, radius = block.global_to_local_bounds(entities[name], spans[name])
            _, any_mention = block.global_to_local_bounds(entities[name])
            assert radius.shape == g2l.shape and any_mention.shape == center.shape
            assert ((g2l - center[None, :]).abs() <= radius).all(), name
            assert (radius <= any_mention[None, :]).all()
            # sqrt(tokens / d) of the mention-independent radius, about: 0.79 for text, 0.52 for image
            assert (radius / any_mention[None, :]).mean() < (0.85 if name == "text" else 0.6), name
        scores = index.scores(model, mentions)
        lower, upper = model.score_bounds(prepared, entities, spans)
        assert (lower <= scores).all() and (scores <= upper).all()
        loose_lower, loose_upper = model.score_bounds(prepared, entities, {k: None for k in spans})
        assert ((upper - lower) <= (loose_upper - loose_lower)).all()
        assert (upper - lower).mean() < 0.8 * (loose_upper - loose_lower).mean()
    # and the pruned ranker, which uses them, still ranks exactly as scoring every pair
    stats = {}
    assert torch.equal(index.rank(model, mentions, gold, stats=stats), index.rank(model, mentions, gold, prune=False))


@pytest.mark.parametrize("overrides", [{}, {"cross_modal": "bidirectional"}, {"use_image_matching": False}])
def test_refined_bounds_score_fewer_pairs_with_the_same_results(processor, monkeypatch, overrides):
    """One G2L block computed exactly for the undecided pairs narrows their bounds: far fewer pairs are scored in
    full, and `rank` and `topk` return what they return without it and what scoring every pair gives. With a
    single G2L block there is nothing to refine."""
    model = _model(processor, **WIDE, **overrides)
    index, mentions, gold = _kb_and_mentions(model, noise=3.0)
    results = {}
    for refine in (False, True):
        monkeypatch.setattr(EntityIndex, "refine_bounds", refine)
        rank_stats, topk_stats = {}, {}
        ranks = index.rank(model, mentions, gold, chunk_size=100, stats=rank_stats)
        values, rows, _ = index.topk(model, mentions, k=3, chunk_size=100, stats=topk_stats)
        results[refine] = ranks, values, rows, rank_stats, topk_stats
    full_ranks = index.rank(model, mentions, gold, prune=False)
    full_values, full_rows, _ = index.topk(model, mentions, k=3, prune=False)
    for ranks, values, rows, _, _ in results.values():
        assert torch.equal(ranks, full_ranks) and torch.equal(rows, full_rows)
        torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
    plain, refined = results[False], results[True]
    assert plain[3]["refined"] == plain[4]["refined"] == 0
    if overrides.get("use_image_matching", True):
        for before, after in ((plain[3], refined[3]), (plain[4], refined[4])):
            assert after["refined"] > 0 and after["scored"] < 0.7 * before["scored"]
    else:
        assert refined[3] == plain[3] and refined[4] == plain[4]


def test_kernel_steps_are_counted_per_tile(processor):
    """`stats` counts the fused kernels' program steps (one mention against a tile of a few entities) for the pairs
    left after the bounds: the candidates kernel packs each mention's needed entities into tiles, the masked grid
    runs a step for every tile of consecutive entities with one needed; both at most the unmasked grid's."""
    from modeling_m3el.kernels_m3el import entities_per_step

    model = _model(processor, **WIDE)
    index, mentions, gold = _kb_and_mentions(model, noise=3.0)
    tiles = {b: entities_per_step(index.tensors[f"{b}.query"].shape[1], index.dtype) for b in ("text", "image")}
    needed = torch.zeros(3, 2 * max(tiles.values()) + 1, dtype=torch.bool)
    needed[0, 0] = needed[0, -1] = True  # two entities in two tiles
    needed[1, :] = True  # every entity
    counted = {}
    index._count_steps(counted, needed, every_pair=True)
    tile_count = {b: -(-needed.shape[1] // t) for b, t in tiles.items()}
    assert counted == {
        "steps_candidates": sum(1 + tile_count[b] for b in tiles),
        "steps_grid": sum(2 + tile_count[b] for b in tiles),
        "steps_every_pair": sum(3 * tile_count[b] for b in tiles),
    }
    index._count_steps(counted, needed, ["text"])  # one block (the refinement's)
    assert counted["steps_every_pair"] == sum(3 * tile_count[b] for b in tiles)
    assert counted["steps_candidates"] == sum(1 + tile_count[b] for b in tiles) + 1 + tile_count["text"]
    stats = {}
    index.rank(model, mentions, gold, chunk_size=100, stats=stats)
    chunks = [min(100, len(index) - start) for start in range(0, len(index), 100)]  # the bounds' chunks
    assert stats["steps_every_pair"] == len(gold) * sum(-(-c // t) for c in chunks for t in tiles.values())
    assert 0 < stats["steps_candidates"] <= stats["steps_grid"] < stats["steps_every_pair"]


def test_kernel_steps_of_the_candidates_kernel_count_its_own_tile(processor, monkeypatch):
    """A launch that gives the candidates kernel its own query rows (`candidate_rows`) changes its tile, hence the
    steps counted for it, and not the grid's."""
    from modeling_m3el import kernels_m3el

    model = _model(processor, **WIDE)
    index, mentions, gold = _kb_and_mentions(model, noise=3.0)
    needed = torch.ones(2, 30, dtype=torch.bool)
    before = {}
    index._count_steps(before, needed, every_pair=True)
    launch = kernels_m3el.LAUNCH["float32"]
    monkeypatch.setitem(kernels_m3el.LAUNCH, "float32", {**launch, "candidate_rows": 2 * launch["rows"]})
    after = {}
    index._count_steps(after, needed, every_pair=True)
    assert after["steps_grid"] == before["steps_grid"] and after["steps_every_pair"] == before["steps_every_pair"]
    tokens = {b: index.tensors[f"{b}.query"].shape[1] for b in ("text", "image")}
    tiles = {b: (2 * launch["rows"]) // t for b, t in tokens.items()}  # 256 rows: 6 text entities, 15 image ones
    assert after["steps_candidates"] == sum(2 * -(-30 // t) for t in tiles.values()) < before["steps_candidates"]


def test_mention_span_of_linearly_dependent_values(processor):
    """Repeated tokens (padding, say) make a mention's values linearly dependent: its basis then comes from
    Householder QR instead of Cholesky QR, and still spans its values; the bounds hold."""
    model = _model(processor, **WIDE)
    index, mentions, gold = _kb_and_mentions(model)
    tokens = mentions.text_tokens.clone()
    tokens[0] = tokens[0, :1]  # one token, 40 times
    tokens[1, 20:] = tokens[1, 19:20]  # the last 21 tokens the same
    mentions = M3ELFeatures(**{**mentions, "text_tokens": tokens})
    with torch.no_grad():
        prepared = index._on_index(model.prepare_mentions(mentions))
        span = model.text_matching.mention_span(prepared["text"])
        basis = span["basis"].double()
        assert torch.isfinite(span["scale"]).all() and span["scale"].max() < 1 + 1e-5
        values = prepared["text"]["value"].double()
        centered = values - values.mean(dim=-1, keepdim=True)
        outside = (centered - (centered @ basis) @ basis.transpose(1, 2)).norm(dim=-1).amax(dim=1)
        assert (outside <= 1e-5 * centered.norm(dim=-1).amax(dim=1)).all()
        entities = index._prepared(0, len(index))
        g2l = model.text_matching.global_to_local(prepared["text"], entities["text"])
        center, radius = model.text_matching.global_to_local_bounds(entities["text"], span)
        assert ((g2l - center[None, :]).abs() <= radius).all()
    assert torch.equal(index.rank(model, mentions, gold), index.rank(model, mentions, gold, prune=False))


@pytest.mark.parametrize("precision", ["highest", "high", "medium"])
def test_mention_dependent_bounds_allow_for_cancelling_values(processor, precision):
    """Values with a large common offset: the context's centring cancels most of its digits, and the rounding that
    is left points off the span. The bounds allow for it (here by falling back to the bound for any mention), under
    any float32 matmul precision."""
    model = _model(processor, **WIDE)
    with torch.no_grad():
        model.text_matching.value.bias.add_(3e3)  # every channel of every text value: + 3,000
        model.image_matching.value.bias.add_(3e3 * torch.linspace(1, 1.001, 64))
    index, mentions, gold = _kb_and_mentions(model)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with torch.no_grad():
            prepared = index._on_index(model.prepare_mentions(mentions))
            entities = index._prepared(0, len(index))
            spans = model.mention_spans(prepared)
            for name, block in (("text", model.text_matching), ("image", model.image_matching)):
                g2l = block.global_to_local(prepared[name], entities[name])
                center, radius = block.global_to_local_bounds(entities[name], spans[name])
                assert ((g2l - center[None, :]).abs() <= radius).all(), name
                # values of norm ~24,000: the rounding they allow for is wider than the projection saves
                torch.testing.assert_close(radius, block.global_to_local_bounds(entities[name])[1].expand_as(radius))
        pruned = index.rank(model, mentions, gold)
        assert torch.equal(pruned, index.rank(model, mentions, gold, prune=False))
    finally:
        torch.set_float32_matmul_precision(previous)


PER_BACKEND_SETTING = textwrap.dedent(
    """
    import sys
    import torch
    from modeling_m3el.modeling_m3el import _product_rounding
    from modeling_m3el.tiny import tiny_processor
    from test_pruned_ranking import WIDE, _kb_and_mentions, _model

    exec(sys.argv[1])  # the setting
    model = _model(tiny_processor(), **WIDE)
    index, mentions, gold = _kb_and_mentions(model, noise=3.0)
    pruned = index.rank(model, mentions, gold)
    assert torch.equal(pruned, index.rank(model, mentions, gold, prune=False))
    print(_product_rounding(torch.float32, torch.device("cpu")), _product_rounding(torch.float32, torch.device("cuda")))
    """
)


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9: no per-backend setting")
@pytest.mark.parametrize("setting, cpu, cuda", [
    ("torch.backends.fp32_precision = 'tf32'", 2.0**-11, 2.0**-11),  # every backend, the way PyTorch now advises
    # the CPU's alone: torch then refuses to report the global setting, so CUDA's margin (its own unset) is the coarsest
    ("torch.backends.mkldnn.matmul.fp32_precision = 'bf16'", 2.0**-8, 2.0**-8),
    # the legacy setting (which sets the CPU's to TF32), then CUDA's own
    ("torch.set_float32_matmul_precision('high'); torch.backends.cuda.matmul.fp32_precision = 'ieee'", 2.0**-11, 0.0),
])
def test_bounds_follow_the_per_backend_float32_matmul_settings(setting, cpu, cuda):
    """The rounding margin of the bounds follows torch's per-backend float32 matmul settings as it follows the global
    one, and is the coarsest where torch will not report its setting; the ranker runs and its pruned ranks equal
    every pair's under each. (In a subprocess: the settings are global to a process.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    completed = subprocess.run([sys.executable, "-c", PER_BACKEND_SETTING, setting], capture_output=True, text=True,
                               timeout=300, env=env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert [float(x) for x in completed.stdout.split()] == [cpu, cuda]


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
        # among candidates too: a NaN score would otherwise sort first
        with pytest.raises(ValueError, match=r"one of the K candidates is NaN for mention\(s\) \[2\]"):
            index.topk(model, broken, k=3, candidates=10)
        with pytest.raises(ValueError, match=r"one of the K candidates is NaN for mention\(s\) \[2\]"):
            index.rank(model, broken, gold, candidates=10)


@pytest.mark.parametrize("overrides", VARIANTS)
def test_score_estimate_is_the_dot_products_plus_the_g2l_centres(processor, overrides):
    """`score_estimate`: the score with each G2L part replaced by its centre `<c_e, beta>` (the LayerNorm's bias
    against the entity's global vector), computed here from the exact scores and the G2L parts in float64; and the
    middle of the bounds."""
    model = _model(processor, dtype=torch.float64, **overrides)
    index, mentions, _ = _kb_and_mentions(model)
    with torch.no_grad():
        prepared = model.prepare_mentions(mentions)
        entities = index._prepared(0, len(index))
        estimate = model.score_estimate(prepared, entities)
        expected = model.score_prepared(prepared, entities).logits.clone()
        for name, block in model._intra_modal_blocks():
            g2l = block.global_to_local(prepared[name], entities[name])
            centre = entities[name]["global"] @ block.context_norm.bias
            expected += (centre[None, :] - g2l) / (2 * len(model.config.branches))
        lower, upper = model.score_bounds(prepared, entities)
    assert estimate.dtype == torch.float64 and estimate.shape == (NUM_MENTIONS, NUM_ENTITIES)
    torch.testing.assert_close(estimate, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(estimate, (lower + upper) / 2, rtol=1e-12, atol=1e-12)
    if model.text_matching is not None or model.image_matching is not None:
        assert not torch.allclose(estimate, model.score_prepared(prepared, entities).logits, atol=1e-3)


@pytest.mark.parametrize("overrides", [{}, {"cross_modal": "bidirectional"}, {"use_text_matching": False}])
def test_topk_among_candidates_rescores_the_best_estimated_exactly(processor, overrides):
    """`topk(candidates=K)`: the exact scores of the K entities with the best estimate, their top k; K at least the
    KB size gives the exact top k."""
    model = _model(processor, g2l_scale=3.0, **WIDE, **overrides)
    index, mentions, _ = _kb_and_mentions(model, noise=3.0)
    with torch.no_grad():
        prepared = model.prepare_mentions(mentions)
        entities = index._prepared(0, len(index))
        estimate = model.score_estimate(prepared, entities)
        exact = model.score_prepared(prepared, entities).logits
    full_values, full_rows, full_ids = index.topk(model, mentions, k=5, prune=False)
    for num_candidates in (len(index), len(index) + 7):
        values, rows, ids = index.topk(model, mentions, k=5, candidates=num_candidates)
        assert torch.equal(rows, full_rows) and ids == full_ids
        torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)
    missed = 0
    for num_candidates, chunk_size in ((1, None), (12, None), (12, 50), (40, 7)):
        stats = {}
        values, rows, ids = index.topk(model, mentions, k=5, candidates=num_candidates, chunk_size=chunk_size,
                                       stats=stats)
        k = min(5, num_candidates)
        assert rows.shape == values.shape == (NUM_MENTIONS, k)
        assert stats == {"pairs": NUM_MENTIONS * len(index), "scored": NUM_MENTIONS * num_candidates}
        chosen = estimate.topk(num_candidates, dim=1).indices
        among = torch.full_like(exact, float("-inf")).scatter(1, chosen, exact.gather(1, chosen))
        expected_values, expected_rows = among.topk(k, dim=1)
        assert torch.equal(rows, expected_rows), num_candidates
        torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
        assert ids == [[index.entity_ids[r] for r in row] for row in rows.tolist()]
        missed += int((rows[:, 0] != full_rows[:, 0]).sum())
    assert missed > 0  # not vacuous: with few candidates some exact top-1 lie outside them
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="candidates must be a positive integer"):
            index.topk(model, mentions, k=5, candidates=bad)


def test_bound_chunks_keep_the_entity_vectors_within_the_budget(processor):
    """One mention (the pipeline's call) against a large KB: a chunk's entity vectors in float32 (converted from a
    half-precision index by the bounds and the estimate) fit the budget, not only its (1, chunk) products."""
    model = _model(processor, **WIDE)
    index, mentions, _ = _kb_and_mentions(model)
    index = index.to(dtype=torch.bfloat16)
    vector_floats = sum(t.shape[1] for t in index.tensors.values() if t.dim() == 2)
    budget = 200 * 4 * vector_floats  # room for the vectors of about 200 entities
    chunks = list(index._bound_chunks(1, None, budget))
    assert chunks[0] == (0, chunks[0][1]) and chunks[-1][1] == len(index) and len(chunks) >= 3
    assert all(4 * vector_floats * (stop - start) <= budget for start, stop in chunks)
    single = M3ELFeatures(**{k: v[:1] for k, v in mentions.items()})
    values, rows, _ = index.topk(model, single, k=3, memory_budget_bytes=budget)
    full_values, full_rows, _ = index.topk(model, single, k=3, prune=False)
    assert torch.equal(rows, full_rows)
    torch.testing.assert_close(values, full_values, rtol=1e-5, atol=1e-5)


def test_rank_among_candidates_is_the_gold_position_in_the_candidates_topk(processor):
    """`rank(candidates=K)`: the gold's rank among the K candidates of `topk(candidates=K)` (ties against it), or the
    KB size when it is not one of them; K at least the KB size gives the exact ranks."""
    model = _model(processor, g2l_scale=3.0, **WIDE)
    index, mentions, gold = _kb_and_mentions(model, noise=3.0, duplicates=3)  # exact ties with twins too
    exact = index.rank(model, mentions, gold)
    assert torch.equal(index.rank(model, mentions, gold, candidates=len(index)), exact)
    with torch.no_grad():
        prepared = model.prepare_mentions(mentions)
        estimate = model.score_estimate(prepared, index._prepared(0, len(index)))
        scores = model.score_prepared(prepared, index._prepared(0, len(index))).logits
    positions = index.positions(gold)
    for num_candidates in (1, 5, 30):
        stats = {}
        ranks = index.rank(model, mentions, gold, candidates=num_candidates, stats=stats)
        chosen = estimate.topk(num_candidates, dim=1).indices
        expected = []
        for row, position in enumerate(positions.tolist()):
            if position in chosen[row].tolist():
                candidate_scores = scores[row, chosen[row]]
                expected.append(int((candidate_scores >= scores[row, position]).sum()))
            else:
                expected.append(len(index))
        assert ranks.tolist() == expected, num_candidates
        assert stats["among_candidates"] == sum(r < len(index) for r in expected)
        assert stats["scored"] == NUM_MENTIONS * num_candidates
        # never better than the exact rank where the gold is found: the candidates are among all entities
        found = ranks < len(index)
        assert (ranks[found] <= exact[found]).all()
    assert 0 < stats["among_candidates"] < NUM_MENTIONS  # K = 30 of 304: some golds found, some missed
