"""The fused G2L kernel against the PyTorch path, same model and features: scores of every (mention, entity) pair
in float32 and bfloat16 (and float16: `--dtypes`), the pruned ranks, and the time of one `EntityIndex.scores` call
(every pair: the grid kernel without a mask), one `EntityIndex.score_candidates` call (each mention against its own
list of a quarter of the KB: the candidates kernel, which scores the pruned ranker's undecided pairs and two-stage
retrieval's candidates) and one `EntityIndex.rank` call (pruned: the candidates kernel, or the masked grid, as
`EntityIndex.pruned_scoring` says) of each path. On CUDA also launch variants (`kernels_m3el.LAUNCH`: query rows,
warps, registers, pipeline stages, float32 products by TF32x3 or IEEE, and the candidates kernel's own), timed and
compared the same way; `--launch-out` writes, for the other benchmarks' `--launch`, the fastest launch of each
kernel among those that agree: the grid's by the `scores` call, the candidates kernel's by the `score_candidates`
call (at a few thousand entities a `rank` call is mostly the bounds and the bookkeeping, not the kernels).

The first thing `run_gpu.sh` runs: it compiles the kernel and says whether it agrees before anything is timed.
Exits 1 when the kernel falls back, fails, or disagrees. `--budget-s` keeps it within a time limit (variants not
started in time are listed as skipped).

    python benchmarks/check_kernel.py --device cuda --model b32 --sizes 4096
    TRITON_INTERPRET=1 python benchmarks/check_kernel.py --device cpu --check     # Triton's interpreter, tiny
"""

import argparse
import contextlib
import math
import os
import sys
import time
import warnings

import torch

from common import add_common_arguments, add_noise_argument, apply_threads, build_model, default_noise, machine
from common import best_of, generator_for, markdown_table, parse_sizes, random_kb_with_mentions, timed, write_json

from modeling_m3el import kernels_m3el
from modeling_m3el.kernels_m3el import FALLBACK, KERNEL_ENV

# Launch variants timed on CUDA next to the launch `kernels_m3el.LAUNCH` chooses: query rows per program, warps,
# registers, pipeline stages, mentions a program step, and the candidates kernel's own rows, warps, registers, stages
# and mention loaded once (hoist). The scores, listed scores and pruned ranks of every variant are compared with the
# PyTorch path's too. `registers` 128: two programs of 8 warps per SM instead of one (compiled for sm_90 with
# Triton 3.6: bf16 without spills at 128 rows, 72-80 bytes spilled at 256; `kernel_compile.py`).
VARIANTS = {
    # (dropped after the H200's calls 1-2: IEEE float32 products, 25x slower than TF32x3; 4 and 16 warps in bf16,
    # 16 in float32; in session 8, to leave time for the candidates kernel's variants, bf16 at 128 rows with 2
    # stages or 2 mentions a step)
    "float32": [
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3"},
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "mentions": 2},
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "hoist": True},
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "candidate_registers": 128},
    ],
    "half": [
        {"rows": 256, "warps": 8, "stages": 1}, {"rows": 256, "warps": 8, "stages": 2},
        {"rows": 128, "warps": 8, "stages": 1}, {"rows": 128, "warps": 8, "stages": 1, "registers": 128},
        {"rows": 256, "warps": 8, "stages": 1, "mentions": 2}, {"rows": 128, "warps": 8, "stages": 1, "mentions": 4},
        {"rows": 256, "warps": 8, "stages": 1, "hoist": True},
        {"rows": 128, "warps": 8, "stages": 1, "hoist": True, "candidate_stages": 2},
        {"rows": 256, "warps": 8, "stages": 1, "candidate_registers": 128},
        {"rows": 256, "warps": 8, "stages": 1, "candidate_rows": 128, "candidate_registers": 128, "hoist": True},
    ],
}
# The keys of a launch that the grid kernel reads: the launch written for --launch-out takes them from the variant
# fastest at `scores`, and the candidates kernel's (`kernels_m3el.resolve_launch`) from the one fastest at
# `score_candidates`.
GRID_KEYS = ("rows", "warps", "stages", "mentions", "registers", "precision")


def label(launch: dict) -> str:
    stages = launch.get("stages", 1)
    parts = [f"{launch['rows']} rows", f"{launch['warps']} warps", f"{stages} stage{'s' if stages > 1 else ''}"]
    if launch.get("registers"):
        parts.append(f"{launch['registers']} registers")
    if launch.get("mentions", 1) > 1:
        parts.append(f"{launch['mentions']} mentions a step")
    own = [f"{launch['candidate_rows']} rows"] if "candidate_rows" in launch else []
    own += [f"{launch['candidate_warps']} warps"] if "candidate_warps" in launch else []
    own += [f"{launch['candidate_registers']} registers"] if launch.get("candidate_registers") else []
    own += ["mention hoisted"] if launch.get("hoist") else []
    own += [f"{launch['candidate_stages']} stages"] if launch.get("candidate_stages", 1) > 1 else []
    parts += [f"candidates kernel: {', '.join(own)}"] if own else []
    return ", ".join(parts + ([launch["precision"]] if "precision" in launch else []))


def grid_launch(launch: dict) -> dict:
    """What the grid kernel takes from `launch`, defaults filled in (to compare launches)."""
    return kernels_m3el.resolve_launch(launch)


def candidate_launch(launch: dict) -> dict:
    """What the candidates kernel takes from `launch`, defaults filled in (to compare launches)."""
    return kernels_m3el.resolve_launch(launch, candidates=True)


def listed_rows(num_mentions: int, num_entities: int, device, seed: int) -> torch.Tensor:
    """Each mention's list for `score_candidates`: a quarter of the KB at random, in increasing order (as the pruned
    ranker lists its undecided pairs)."""
    generator = generator_for(device, seed + 1)
    count = max(1, num_entities // 4)
    order = torch.rand((num_mentions, num_entities), generator=generator, device=device).argsort(dim=1)
    return order[:, :count].sort(dim=1).values


def tolerance(dtype: torch.dtype, reference: torch.Tensor, spread: float) -> float:
    """Agreement: within a tenth of the scores' spread (float32: 1e-4 of it), plus one unit in the last place of the
    largest score in the index's dtype (`scores` returns the index's dtype: bfloat16 rounds a score of 150 to 1)."""
    return (1e-4 if dtype == torch.float32 else 0.1) * spread + torch.finfo(dtype).eps * float(reference.abs().max())


@contextlib.contextmanager
def launched_as(key: str, launch: dict):
    chosen = kernels_m3el.LAUNCH[key]
    kernels_m3el.LAUNCH[key] = launch
    try:
        yield
    finally:
        kernels_m3el.LAUNCH[key] = chosen


def compare(
    index, model, mentions, gold_ids, device, dtype: torch.dtype, with_variants: bool, deadline: float = math.inf
) -> tuple[dict, list]:
    """The kernel as `kernels_m3el.LAUNCH` launches it, then each variant, against the PyTorch path: max abs
    difference of the scores and of the listed scores (and whether within `tolerance`), pruned ranks equal, and the
    time of one `scores`, one `score_candidates` (the fastest of 3) and one `rank` call. Variants not started by
    `deadline` (`time.monotonic()`) are listed as skipped."""
    key = "float32" if dtype == torch.float32 else "half"
    os.environ[KERNEL_ENV] = "torch"
    reference, torch_seconds = timed(lambda: index.scores(model, mentions), device)
    reference_ranks, torch_rank_seconds = timed(lambda: index.rank(model, mentions, gold_ids), device)
    rows = listed_rows(len(gold_ids), len(index), device, 0)
    listed_reference = reference.float().gather(1, rows)
    spread = float(reference.float().std())
    limit = tolerance(dtype, reference.float(), spread)

    def run() -> dict:
        index.scores(model, mentions)  # compiles
        fused, seconds = timed(lambda: index.scores(model, mentions), device)
        difference = float((fused.float() - reference.float()).abs().max())
        index.score_candidates(model, mentions, rows)  # the candidates kernel: compiles
        listed, listed_seconds = best_of(lambda: index.score_candidates(model, mentions, rows), device, 3)
        listed_difference = float((listed - listed_reference).abs().max())
        index.rank(model, mentions, gold_ids)  # the pruned ranker's kernel: more compilations
        ranks, rank_seconds = timed(lambda: index.rank(model, mentions, gold_ids), device)
        return {"max_abs_diff": difference, "candidates_max_abs_diff": listed_difference,
                "agrees": difference <= limit and listed_difference <= limit, "kernel_ms": 1000 * seconds,
                "candidates_ms": 1000 * listed_seconds, "rank_ms": 1000 * rank_seconds,
                "ranks_equal": float((ranks == reference_ranks).float().mean())}

    os.environ[KERNEL_ENV] = "triton"  # forced: a failure raises instead of falling back
    try:
        result = {**run(), "launch": dict(kernels_m3el.LAUNCH[key]), "score_spread": spread, "tolerance": limit,
                  "listed_pairs": rows.numel(), "torch_ms": 1000 * torch_seconds,
                  "torch_rank_ms": 1000 * torch_rank_seconds}
        variants = []
        for launch in VARIANTS[key] if with_variants else ():
            if time.monotonic() > deadline:
                variants.append({"variant": label(launch), "launch": launch, "error": "skipped: out of time"})
                continue
            try:
                with launched_as(key, launch):
                    variants.append({"variant": label(launch), "launch": launch, **run()})
            except Exception as error:  # a variant that does not compile is reported, not a failed check
                variants.append({"variant": label(launch), "launch": launch,
                                 "error": f"{type(error).__name__}: {str(error)[:200]}"})
    finally:
        os.environ[KERNEL_ENV] = "auto"
    return result, variants


def fastest(result: dict, variants: list[dict], dtype: str) -> dict:
    """Among the launches that agree (float32: with every pruned rank equal too), the chosen one included: the grid
    kernel's keys of the one with the least `scores` time, and the candidates kernel's (`candidate_launch`) of the one
    with the least `score_candidates` time among those with the same float32 precision."""
    timed_launches = [result] + [variant for variant in variants if "error" not in variant]
    good = [c for c in timed_launches if c["agrees"] and (dtype != "float32" or c["ranks_equal"] == 1.0)] or [result]
    grid = min(good, key=lambda c: c["kernel_ms"])["launch"]
    same = [c for c in good if c["launch"].get("precision") == grid.get("precision")]
    listed = min(same, key=lambda c: c["candidates_ms"])["launch"]
    launch = {k: grid[k] for k in GRID_KEYS if k in grid}
    own, inherited = candidate_launch(listed), candidate_launch(launch)
    # the candidates kernel's keys only where they differ from what it would take from the grid's
    launch.update({kernels_m3el.CANDIDATE_KEYS.get(k, k): v for k, v in own.items() if v != inherited[k]})
    return launch


def main(argv=None) -> int:
    parser = add_noise_argument(add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                                                     sizes="4096"))
    parser.add_argument("--mentions", type=int, default=64)
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="time the launch variants too (default: on CUDA; Triton's interpreter ignores warps and "
                        "stages, and computes float32 products in float32 whatever the precision)")
    parser.add_argument("--budget-s", type=float, default=math.inf,
                        help="seconds for the whole check: variants not started by then are skipped (and listed), "
                        "so that the tables and --launch-out are written within a caller's time limit: the float32 "
                        "variants start within the first 45%% of it, the half-precision ones up to 15 s before its end")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="the index dtypes to check, of float32, bfloat16 and float16 (the last two share the "
                        "'half' launch)")
    parser.add_argument("--launch-out", help="write the fastest launch that agrees, per index dtype, to this JSON "
                        "file (for the --launch of bench_exact_ranking.py and bench_two_stage.py)")
    args = parser.parse_args(argv)
    dtypes = [dtype.strip() for dtype in args.dtypes.split(",") if dtype.strip()]
    if not dtypes or set(dtypes) - {"float32", "bfloat16", "float16"}:
        parser.error(f"--dtypes: a comma-separated list of float32, bfloat16 and float16, got {args.dtypes!r}")
    if args.check:
        args.model, args.sizes, args.mentions = "tiny", "40", 4
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    rows, variant_rows, results, best, ok = [], [], [], {}, True
    started = time.monotonic()
    deadlines = {"float32": started + 0.45 * args.budget_s, "bfloat16": started + args.budget_s - 15,
                 "float16": started + args.budget_s - 15}
    for num_entities in parse_sizes(args.sizes):
        index, mentions, gold_ids = random_kb_with_mentions(model, num_entities, args.mentions, device, args.seed,
                                                            default_noise(args.model, args.noise))
        for dtype in dtypes:
            key = "float32" if dtype == "float32" else "half"
            # The kernel is forced (a failure raises); a fallback warning would be a failure too. Other warnings
            # (Triton's own, for one) are shown, not turned into failures.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result, variants = compare(
                        index.to(dtype=getattr(torch, dtype)), model, mentions, gold_ids, device,
                        getattr(torch, dtype), device.type == "cuda" if args.variants is None else args.variants,
                        deadlines[dtype],
                    )
                except Exception as error:
                    print(f"{dtype}: the kernel failed: {type(error).__name__}: {error}", file=sys.stderr)
                    result = None
            for warning in caught:
                print(f"{dtype}: warning: {warning.category.__name__}: {warning.message}", file=sys.stderr)
            if result is None or any(FALLBACK in str(warning.message) for warning in caught):
                ok = False
                continue
            ok &= result["agrees"] and (dtype != "float32" or result["ranks_equal"] == 1.0)
            best[key] = fastest(result, variants, dtype)
            results.append({"entities": num_entities, "dtype": dtype, **result, "variants": variants,
                            "fastest_launch": best[key]})
            difference = max(result["max_abs_diff"], result["candidates_max_abs_diff"])
            rows.append([f"{num_entities:,}", dtype, label(result["launch"]), f"{difference:.2e}",
                         f"{result['tolerance']:.2e}", f"{100 * result['ranks_equal']:.1f}%",
                         f"{result['torch_ms']:.1f} / {result['kernel_ms']:.1f}", f"{result['candidates_ms']:.2f}",
                         f"{result['torch_rank_ms']:.1f} / {result['rank_ms']:.1f}",
                         "yes" if result["agrees"] else "NO"])
            for variant in variants:
                if "error" in variant:
                    status = "skipped" if variant["error"].startswith("skipped") else "failed"
                    variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], status, "-", "-",
                                         variant["error"], "-", "-"])
                    continue
                chosen = [kernel for kernel, part in (("grid", grid_launch), ("candidates", candidate_launch))
                          if part(variant["launch"]) == part(best[key])]
                variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], f"{variant['kernel_ms']:.1f}",
                                     f"{variant['candidates_ms']:.2f}", f"{variant['rank_ms']:.1f}",
                                     f"{max(variant['max_abs_diff'], variant['candidates_max_abs_diff']):.2e}",
                                     f"{100 * variant['ranks_equal']:.1f}%", ", ".join(chosen)])
    print(f"# Fused G2L kernel vs PyTorch: {args.model} model, {args.mode}, {args.mentions} mentions (noise "
          f"{default_noise(args.model, args.noise):g}); {machine(device)}")
    print(markdown_table(["entities", "index dtype", "launch (kernels_m3el.LAUNCH)", "max abs(kernel - torch)",
                          "tolerance", "pruned ranks equal", "scores() ms, torch / kernel",
                          "score_candidates() kernel ms", "rank() ms, torch / kernel", "agrees"], rows))
    if variant_rows:
        print("\nLaunch variants (the same calls; among those that agree, in float32 with every pruned rank equal: "
              "the grid kernel's launch of the least scores() time, the candidates kernel's of the least "
              "score_candidates() time):\n")
        print(markdown_table(["entities", "index dtype", "variant", "scores() kernel ms",
                              "score_candidates() kernel ms", "rank() kernel ms", "max abs(kernel - torch)",
                              "pruned ranks equal", "fastest for"], variant_rows))
    write_json(args.json, {"machine": machine(device), "results": results})
    if args.launch_out and best:
        write_json(args.launch_out, best)
        print(f"\nfastest launches written to {args.launch_out}: {best}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
