"""The fused G2L kernel (`modeling_m3el/kernels_m3el.py`), run by Triton's interpreter on the CPU: the same G2L
scores as the PyTorch path, pairs outside the `needed` mask skipped, and the exact ranker's results unchanged when
its scores go through the kernel. (On a GPU the same kernel is compiled; `benchmarks/run_gpu.sh` checks its ranks
against the naive loop.)"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import skip_unless_triton_interprets

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from modeling_m3el import M3ELFeatures
    from modeling_m3el.index_m3el import EntityIndex
    from modeling_m3el.kernels_m3el import KERNEL_ENV, fused_g2l_wanted, fused_global_to_local
    from modeling_m3el.tiny import tiny_processor
    from test_pruned_ranking import _features, _model

    def use(kernel):
        os.environ[KERNEL_ENV] = kernel

    processor = tiny_processor()
    generator = torch.Generator().manual_seed(0)

    for mode in ("text_to_image", "bidirectional"):
        model = _model(processor, seed=1, cross_modal=mode)
        entities = _features(model, 37, generator)
        gold = torch.randint(0, 37, (5,), generator=generator)
        noise = _features(model, 5, generator)
        mentions = M3ELFeatures(**{k: entities[k][gold] + noise[k] for k in entities.keys()})
        ids = [f"E{i}" for i in range(37)]
        index = EntityIndex.from_features(model, entities, ids)
        gold_ids = [ids[g] for g in gold.tolist()]

        use("torch")
        reference = index.scores(model, mentions)
        reference_ranks = index.rank(model, mentions, gold_ids, prune=False)
        reference_top = index.topk(model, mentions, k=3, prune=False)
        use("triton")
        assert index._fused()
        fused = index.scores(model, mentions)
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(index.rank(model, mentions, gold_ids), reference_ranks)
        top = index.topk(model, mentions, k=3)
        torch.testing.assert_close(top[0], reference_top[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(top[1], reference_top[1])
        # The pruned ranker scoring its needed pairs through the masked grid instead of the candidates kernel (the
        # default, each mention's list): the same results.
        assert index.pruned_scoring == "candidates"
        index.pruned_scoring = "grid"
        assert torch.equal(index.rank(model, mentions, gold_ids), reference_ranks)
        top = index.topk(model, mentions, k=3)
        torch.testing.assert_close(top[0], reference_top[0], rtol=1e-5, atol=1e-5)
        assert torch.equal(top[1], reference_top[1])
        index.pruned_scoring = "candidates"
        # Listed candidates scored by the index (two-stage re-scoring): the kernel reads each candidate's rows in
        # place; the dot-product parts gathered (one candidate: K * D < E) or picked from every pair (seven).
        for count in (1, 7):
            rows = torch.randint(0, 37, (5, count), generator=generator)
            use("torch")
            listed_reference = index.score_candidates(model, mentions, rows)
            use("triton")
            torch.testing.assert_close(index.score_candidates(model, mentions, rows), listed_reference, rtol=1e-5,
                                       atol=1e-5)

        # The kernel alone: G2L of the text block, every pair, then a mask that skips some.
        block = model.text_matching
        prepared_m = model.prepare_mentions(mentions)["text"]
        prepared_e = model.prepare_entities(entities)["text"]
        with torch.no_grad():
            use("torch")
            expected = block.global_to_local(prepared_m, prepared_e)
            key = prepared_m["key"] * block.scale
            full = fused_global_to_local(prepared_e["query"], key, prepared_m["value"], prepared_e["global"],
                                         block.context_norm)
            torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
            needed = torch.rand(expected.shape, generator=generator) < 0.3
            masked = fused_global_to_local(prepared_e["query"], key, prepared_m["value"], prepared_e["global"],
                                           block.context_norm, needed=needed)
            assert torch.equal(masked[needed], full[needed]) and (masked[~needed] == 0).all()
            # bfloat16 inputs: float32 accumulation inside, close to the float32 scores
            half = fused_global_to_local(prepared_e["query"].bfloat16(), key.bfloat16(), prepared_m["value"].bfloat16(),
                                         prepared_e["global"], block.context_norm)
            torch.testing.assert_close(half, expected, rtol=0.05, atol=0.05)
            # Launch variants: several mentions a step (5 mentions: the last step half empty), other tile sizes.
            from modeling_m3el import kernels_m3el
            default = dict(kernels_m3el.LAUNCH)
            for launch in ({"rows": 128, "warps": 4, "mentions": 2, "precision": "tf32x3"},
                           {"rows": 64, "warps": 4, "mentions": 4, "precision": "ieee"}):
                kernels_m3el.LAUNCH["float32"] = launch
                variant = fused_global_to_local(prepared_e["query"], key, prepared_m["value"], prepared_e["global"],
                                                block.context_norm)
                torch.testing.assert_close(variant, expected, rtol=1e-5, atol=1e-5)
                variant = fused_global_to_local(prepared_e["query"], key, prepared_m["value"], prepared_e["global"],
                                                block.context_norm, needed=needed)
                torch.testing.assert_close(variant[needed], full[needed], rtol=1e-5, atol=1e-5)
                assert (variant[~needed] == 0).all()
            kernels_m3el.LAUNCH.update(default)
            # Listed candidates (-1: none), the kernel that gathers each mention's entities: the grid's scores. Then
            # lists of very different lengths padded with -1 to the longest (as the pruned ranker makes them), long
            # enough for several programs a mention: one list empty, one with a whole program's entries of -1 inside.
            from modeling_m3el.kernels_m3el import CANDIDATE_STEPS, entities_per_step
            per_program = entities_per_step(prepared_e["query"].shape[1], torch.float32) * CANDIDATE_STEPS
            uneven = torch.randint(0, expected.shape[1], (expected.shape[0], 2 * per_program + 5), generator=generator)
            uneven[0] = -1
            uneven[1, 3:] = -1
            uneven[2, 7 : 7 + per_program] = -1
            uneven[3, per_program:] = -1
            scattered = torch.randint(-1, expected.shape[1], (expected.shape[0], 11), generator=generator)
            # (and the launch that loads a mention's keys and values once per program, pipelined; and one that gives
            # the candidates kernel its own tile, warps and registers: 1 text entity or 3 image entities a step)
            own = {"candidate_rows": 64, "candidate_warps": 4, "candidate_registers": 128, "registers": 128}
            for launch in (default["float32"], {**default["float32"], "hoist": True, "candidate_stages": 2},
                           {**default["float32"], **own}):
                kernels_m3el.LAUNCH["float32"] = launch
                for candidates in (scattered, uneven):
                    listed = fused_global_to_local(prepared_e["query"], key, prepared_m["value"],
                                                   prepared_e["global"], block.context_norm, candidates=candidates)
                    present = candidates >= 0
                    torch.testing.assert_close(listed[present], full.gather(1, candidates.clamp(min=0))[present],
                                               rtol=1e-6, atol=1e-6)
                    assert (listed[~present] == 0).all()
            kernels_m3el.LAUNCH.update(default)
        use("auto")
        # CPU tensors: the kernel only runs where asked (interpreter); with gradients it never does.
        assert not fused_g2l_wanted(prepared_e["query"])
        use("triton")
        query = prepared_e["query"].detach().requires_grad_()
        assert fused_g2l_wanted(prepared_e["query"].detach())
        assert not fused_g2l_wanted(query)
        assert not fused_g2l_wanted(prepared_e["query"].detach().double())
        print("ok", mode)

    # More channels than tokens (as at B/32 sizes): the pruned ranker's bounds for each mention are tighter than for
    # any mention; they hold for the kernel's scores, float32 and bfloat16 (pruned ranks = every pair's, same kernel).
    model = _model(processor, seed=2, matching_dim=64)
    entities = _features(model, 37, generator)
    gold = torch.randint(0, 37, (5,), generator=generator)
    mentions = M3ELFeatures(**{k: entities[k][gold] + 3 * v for k, v in _features(model, 5, generator).items()})
    ids = [f"E{i}" for i in range(37)]
    index = EntityIndex.from_features(model, entities, ids)
    gold_ids = [ids[g] for g in gold.tolist()]
    use("torch")
    reference_ranks = index.rank(model, mentions, gold_ids, prune=False)
    use("triton")
    assert torch.equal(index.rank(model, mentions, gold_ids), reference_ranks)
    half = index.to(dtype=torch.bfloat16)
    every_pair = half.rank(model, mentions, gold_ids, prune=False)
    assert torch.equal(half.rank(model, mentions, gold_ids), every_pair)
    half.pruned_scoring = "grid"
    assert torch.equal(half.rank(model, mentions, gold_ids), every_pair)
    # Exact ties (three gold entities with an identical twin in the KB) through the kernels: the scores assembled from
    # the refined block's part and the rest tie exactly, in both pruned paths, and the ties count against the gold.
    from test_pruned_ranking import _kb_and_mentions
    index, mentions, gold_ids = _kb_and_mentions(model, noise=3.0, duplicates=3)
    use("torch")
    every_pair = index.rank(model, mentions, gold_ids, prune=False)
    use("triton")
    for path in ("candidates", "grid"):
        index.pruned_scoring = path
        stats = {}
        ranks = index.rank(model, mentions, gold_ids, stats=stats)
        assert torch.equal(ranks, every_pair) and (ranks[:3] >= 2).all() and stats["refined"] > 0, (path, ranks)
    print("ok", "wide")
    """
)


def test_fused_kernel_in_the_triton_interpreter(tmp_path):
    skip_unless_triton_interprets()
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.split() == ["ok", "text_to_image", "ok", "bidirectional", "ok", "wide"]


def test_candidate_work_list_covers_each_listed_entry_once():
    import torch

    from modeling_m3el.kernels_m3el import candidate_programs

    candidates = torch.full((4, 23), -1)
    candidates[0, :23] = 5  # full: 3 programs of 8
    candidates[1, 4] = 2  # extent 5: one program
    candidates[3, [0, 16]] = 1  # a gap of -1 inside: extent 17, 3 programs
    item_mention, item_first, extent = candidate_programs(candidates, per_program=8)
    assert extent.tolist() == [23, 5, 0, 17]
    assert item_mention.tolist() == [0, 0, 0, 1, 3, 3, 3]
    assert item_first.tolist() == [0, 8, 16, 0, 0, 8, 16]
    covered = torch.zeros_like(candidates)
    for mention, first in zip(item_mention.tolist(), item_first.tolist()):
        stop = min(first + 8, int(extent[mention]))
        covered[mention, first:stop] += 1
    assert torch.equal(covered[candidates >= 0], torch.ones(int((candidates >= 0).sum()), dtype=covered.dtype))
    assert int(covered.sum()) == 23 + 5 + 17  # nothing after a list's last entry


def test_kernel_switch_is_validated(monkeypatch):
    import torch

    from modeling_m3el.kernels_m3el import KERNEL_ENV, fused_g2l_wanted

    monkeypatch.setenv(KERNEL_ENV, "cuda-please")
    with pytest.raises(ValueError, match="must be auto, triton or torch"):
        fused_g2l_wanted(torch.zeros(1, 2, 16))


def test_a_failing_kernel_falls_back_to_pytorch_with_a_warning(monkeypatch):
    import torch

    from modeling_m3el import kernels_m3el

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(kernels_m3el, "fused_global_to_local", broken)
    monkeypatch.setattr(kernels_m3el, "_kernel_failure", None)
    query = torch.zeros(2, 40, 16)
    monkeypatch.setenv(kernels_m3el.KERNEL_ENV, "triton")
    with pytest.raises(RuntimeError, match="PTX"):  # forced: the failure is the caller's to see
        kernels_m3el.try_fused_global_to_local(query)
    monkeypatch.setenv(kernels_m3el.KERNEL_ENV, "auto")
    with pytest.warns(UserWarning, match="fused G2L kernel failed .*PTX assembly failed.*PyTorch path"):
        assert kernels_m3el.try_fused_global_to_local(query) is None
    assert not kernels_m3el.fused_g2l_wanted(query.cuda() if torch.cuda.is_available() else query)


def test_a_triton_that_would_abort_the_process_is_refused_before_compiling(monkeypatch):
    """Triton 3.2 (PyTorch 2.6's) aborts the process compiling the float32 kernel, past any fallback: the kernel is
    not compiled with it (one warning, then the PyTorch path), and forcing it says why. The interpreter runs it."""
    import types

    import torch

    from modeling_m3el import kernels_m3el

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels_m3el, "_kernel_failure", None)
    for version in ("3.3.0", "3.3.1+git1a2b3c", "3.10.0"):
        monkeypatch.setattr(kernels_m3el.triton, "__version__", version)
        assert kernels_m3el.compiled_kernel_refused() is None
    monkeypatch.setattr(kernels_m3el.triton, "__version__", "3.2.0")
    reason = kernels_m3el.compiled_kernel_refused()
    assert "Triton 3.2.0 aborts the process" in reason and "Triton 3.3 or newer" in reason
    monkeypatch.setenv(kernels_m3el.KERNEL_ENV, "triton")
    with pytest.raises(RuntimeError, match=r"M3EL_G2L_KERNEL=triton: Triton 3\.2\.0 aborts"):
        kernels_m3el.fused_g2l_wanted(torch.zeros(2, 40, 16))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels_m3el.compiled_kernel_refused() is None
    assert kernels_m3el.fused_g2l_wanted(torch.zeros(2, 40, 16))
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setenv(kernels_m3el.KERNEL_ENV, "auto")
    cuda_query = types.SimpleNamespace(dtype=torch.float32, is_cuda=True, requires_grad=False)  # (no GPU here)
    with pytest.warns(UserWarning, match=r"fused G2L kernel failed .*Triton 3\.2\.0.*PyTorch path"):
        assert not kernels_m3el.fused_g2l_wanted(cuda_query)
    assert kernels_m3el._kernel_failure is not None and not kernels_m3el.fused_g2l_wanted(cuda_query)


def test_the_ranker_survives_a_failing_kernel(monkeypatch):
    """A kernel that fails inside the pruned ranker: one warning, the kernel turned off, and the grid scored by
    PyTorch in pieces that fit the memory budget (the same ranks and top-k as without the kernel)."""
    import torch

    from modeling_m3el import index_m3el, kernels_m3el, modeling_m3el

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_pruned_ranking import _kb_and_mentions, _model

    from modeling_m3el.tiny import tiny_processor

    model = _model(tiny_processor(), cross_modal="bidirectional")
    index, mentions, gold = _kb_and_mentions(model)
    expected_ranks = index.rank(model, mentions, gold, prune=False)
    expected_top = index.topk(model, mentions, k=4, prune=False)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no CUDA toolkit")

    def wanted(*tensors):  # as on a GPU: the kernel is wanted until it has failed
        return kernels_m3el._kernel_failure is None

    monkeypatch.setattr(kernels_m3el, "fused_global_to_local", broken)
    monkeypatch.setattr(kernels_m3el, "_kernel_failure", None)
    monkeypatch.setattr(index_m3el, "fused_g2l_wanted", wanted)
    monkeypatch.setattr(modeling_m3el, "fused_g2l_wanted", wanted)
    monkeypatch.delenv(kernels_m3el.KERNEL_ENV, raising=False)
    budget = 2**21  # the PyTorch grid of a whole bound chunk would not fit: it is scored in pieces
    assert index.chunk_size_for(len(gold), budget) < len(index)
    with pytest.warns(UserWarning, match="fused G2L kernel failed .*no CUDA toolkit"):
        ranks = index.rank(model, mentions, gold, chunk_size=100, memory_budget_bytes=budget)  # 4 chunks
    assert torch.equal(ranks, expected_ranks) and len(calls) == 1
    top = index.topk(model, mentions, k=4, memory_budget_bytes=budget)  # the kernel stays off: no second try
    torch.testing.assert_close(top[0], expected_top[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(top[1], expected_top[1]) and len(calls) == 1
