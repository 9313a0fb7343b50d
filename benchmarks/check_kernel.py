"""The fused G2L kernel against the PyTorch path, same model and features: scores of every (mention, entity) pair
in float32 and bfloat16, the pruned ranks, and the time of one `EntityIndex.scores` call (every pair: the grid
without a mask) and one `EntityIndex.rank` call (pruned: the candidates kernel, or the masked grid, as
`EntityIndex.pruned_scoring` says) of each path. On CUDA also launch
variants (`kernels_m3el.LAUNCH`: query rows, warps, pipeline stages, float32 products by TF32x3 or IEEE), timed and
compared the same way; `--launch-out` writes the fastest that agree for the other benchmarks' `--launch`.

The first thing `run_gpu.sh` runs: it compiles the kernel and says whether it agrees before anything is timed.
Exits 1 when the kernel falls back, fails, or disagrees.

    python benchmarks/check_kernel.py --device cuda --model b32 --sizes 4096
    TRITON_INTERPRET=1 python benchmarks/check_kernel.py --device cpu --check     # Triton's interpreter, tiny
"""

import argparse
import contextlib
import os
import sys
import warnings

import torch

from common import add_common_arguments, add_noise_argument, apply_threads, build_model, default_noise, machine
from common import markdown_table, parse_sizes, random_kb_with_mentions, timed, write_json

from modeling_m3el import kernels_m3el
from modeling_m3el.kernels_m3el import FALLBACK, KERNEL_ENV

# Launch variants timed on CUDA next to the launch `kernels_m3el.LAUNCH` chooses: query rows per program, warps,
# pipeline stages, mentions a program step, the candidates kernel's mention loaded once (hoist) and its own stages
# (the scores and pruned ranks of every variant are compared with the PyTorch path's too).
VARIANTS = {
    # (dropped after the H200's calls 1-2: IEEE float32 products, 25x slower than TF32x3; 4 and 16 warps in bf16)
    "float32": [
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3"},
        {"rows": 128, "warps": 16, "stages": 1, "precision": "tf32x3"},
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "mentions": 2},
        {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "hoist": True},
    ],
    "half": [
        {"rows": 256, "warps": 8, "stages": 1}, {"rows": 256, "warps": 8, "stages": 2},
        {"rows": 128, "warps": 8, "stages": 1}, {"rows": 128, "warps": 8, "stages": 2},
        {"rows": 256, "warps": 8, "stages": 1, "mentions": 2}, {"rows": 128, "warps": 8, "stages": 1, "mentions": 2},
        {"rows": 128, "warps": 8, "stages": 1, "mentions": 4},
        {"rows": 256, "warps": 8, "stages": 1, "hoist": True},
        {"rows": 128, "warps": 8, "stages": 1, "hoist": True, "candidate_stages": 2},
    ],
}


def label(launch: dict) -> str:
    stages = launch.get("stages", 1)
    parts = [f"{launch['rows']} rows", f"{launch['warps']} warps", f"{stages} stage{'s' if stages > 1 else ''}"]
    if launch.get("mentions", 1) > 1:
        parts.append(f"{launch['mentions']} mentions a step")
    if launch.get("hoist"):
        parts.append("mention hoisted (candidates kernel)")
    if launch.get("candidate_stages", 1) > 1:
        parts.append(f"{launch['candidate_stages']} stages (candidates kernel)")
    return ", ".join(parts + ([launch["precision"]] if "precision" in launch else []))


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


def compare(index, model, mentions, gold_ids, device, dtype: torch.dtype, with_variants: bool) -> tuple[dict, list]:
    """The kernel as `kernels_m3el.LAUNCH` launches it, then each variant, against the PyTorch path: max abs
    difference of the scores (and whether within `tolerance`), pruned ranks equal, one `scores` and one `rank` call's
    time."""
    key = "float32" if dtype == torch.float32 else "half"
    os.environ[KERNEL_ENV] = "torch"
    reference, torch_seconds = timed(lambda: index.scores(model, mentions), device)
    reference_ranks, torch_rank_seconds = timed(lambda: index.rank(model, mentions, gold_ids), device)
    spread = float(reference.float().std())
    limit = tolerance(dtype, reference.float(), spread)

    def run() -> dict:
        index.scores(model, mentions)  # compiles
        fused, seconds = timed(lambda: index.scores(model, mentions), device)
        difference = float((fused.float() - reference.float()).abs().max())
        index.rank(model, mentions, gold_ids)  # the pruned ranker's kernel: more compilations
        ranks, rank_seconds = timed(lambda: index.rank(model, mentions, gold_ids), device)
        return {"max_abs_diff": difference, "agrees": difference <= limit, "kernel_ms": 1000 * seconds,
                "rank_ms": 1000 * rank_seconds, "ranks_equal": float((ranks == reference_ranks).float().mean())}

    os.environ[KERNEL_ENV] = "triton"  # forced: a failure raises instead of falling back
    try:
        result = {**run(), "launch": dict(kernels_m3el.LAUNCH[key]), "score_spread": spread, "tolerance": limit,
                  "torch_ms": 1000 * torch_seconds, "torch_rank_ms": 1000 * torch_rank_seconds}
        variants = []
        for launch in VARIANTS[key] if with_variants else ():
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
    """The launch that agrees (float32: with every pruned rank equal too) with the least time for one `scores` and
    one `rank` call together, the chosen one included."""
    candidates = [result] + [variant for variant in variants if "error" not in variant]
    good = [c for c in candidates if c["agrees"] and (dtype != "float32" or c["ranks_equal"] == 1.0)]
    return min(good or [result], key=lambda c: c["kernel_ms"] + c["rank_ms"])["launch"]


def main(argv=None) -> int:
    parser = add_noise_argument(add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]),
                                                     sizes="4096"))
    parser.add_argument("--mentions", type=int, default=64)
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="time the launch variants too (default: on CUDA; Triton's interpreter ignores warps and "
                        "stages, and computes float32 products in float32 whatever the precision)")
    parser.add_argument("--launch-out", help="write the fastest launch that agrees, per index dtype, to this JSON "
                        "file (for the --launch of bench_exact_ranking.py and bench_two_stage.py)")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes, args.mentions = "tiny", "40", 4
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    rows, variant_rows, results, best, ok = [], [], [], {}, True
    for num_entities in parse_sizes(args.sizes):
        index, mentions, gold_ids = random_kb_with_mentions(model, num_entities, args.mentions, device, args.seed,
                                                            default_noise(args.model, args.noise))
        for dtype in ("float32", "bfloat16"):
            key = "float32" if dtype == "float32" else "half"
            # The kernel is forced (a failure raises); a fallback warning would be a failure too. Other warnings
            # (Triton's own, for one) are shown, not turned into failures.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result, variants = compare(
                        index.to(dtype=getattr(torch, dtype)), model, mentions, gold_ids, device,
                        getattr(torch, dtype), device.type == "cuda" if args.variants is None else args.variants,
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
            rows.append([f"{num_entities:,}", dtype, label(result["launch"]), f"{result['max_abs_diff']:.2e}",
                         f"{result['tolerance']:.2e}", f"{100 * result['ranks_equal']:.1f}%",
                         f"{result['torch_ms']:.1f} / {result['kernel_ms']:.1f}",
                         f"{result['torch_rank_ms']:.1f} / {result['rank_ms']:.1f}",
                         "yes" if result["agrees"] else "NO"])
            for variant in variants:
                if "error" in variant:
                    variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], "failed", "-",
                                         variant["error"], "-", "-"])
                    continue
                variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], f"{variant['kernel_ms']:.1f}",
                                     f"{variant['rank_ms']:.1f}", f"{variant['max_abs_diff']:.2e}",
                                     f"{100 * variant['ranks_equal']:.1f}%",
                                     "yes" if variant["launch"] == best[key] else ""])
    print(f"# Fused G2L kernel vs PyTorch: {args.model} model, {args.mode}, {args.mentions} mentions (noise "
          f"{default_noise(args.model, args.noise):g}); {machine(device)}")
    print(markdown_table(["entities", "index dtype", "launch (kernels_m3el.LAUNCH)", "max abs(kernel - torch)",
                          "tolerance", "pruned ranks equal", "scores() ms, torch / kernel",
                          "rank() ms, torch / kernel", "agrees"], rows))
    if variant_rows:
        print("\nLaunch variants (the same calls; fastest: the least scores() + rank() time among those that agree, in "
              "float32 with every pruned rank equal):\n")
        print(markdown_table(["entities", "index dtype", "variant", "scores() kernel ms", "rank() kernel ms",
                              "max abs(kernel - torch)", "pruned ranks equal", "fastest"], variant_rows))
    write_json(args.json, {"machine": machine(device), "results": results})
    if args.launch_out and best:
        write_json(args.launch_out, best)
        print(f"\nfastest launches written to {args.launch_out}: {best}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
