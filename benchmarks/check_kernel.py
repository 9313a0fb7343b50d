"""The fused G2L kernel against the PyTorch path, same model and features: scores of every (mention, entity) pair
in float32 and bfloat16, the pruned ranks, and the time of one `EntityIndex.scores` call of each path. On CUDA also
launch variants, timed and compared the same way: 8 and 16 warps (`kernels_m3el.warps_for` chooses), and float32
products by TF32x3 tensor-core products instead of IEEE FMAs (`kernels_m3el.FLOAT32_PRECISION`).

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

from common import add_common_arguments, apply_threads, build_model, generator_for, machine, markdown_table
from common import parse_sizes, random_features, timed, write_json

from modeling_m3el import M3ELFeatures, kernels_m3el
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.kernels_m3el import FALLBACK, KERNEL_ENV

# Launch variants timed on CUDA next to the launch `kernels_m3el` chooses (label, warps, float32 precision): the
# warp counts `kernels_m3el.warps_for` chooses between at B/32 widths, and, in float32, TF32x3 tensor-core products
# instead of IEEE FMAs (faster if the GPU says so, and close to float32: its scores and ranks are compared too).
VARIANTS = {
    "float32": [("8 warps, ieee", 8, "ieee"), ("16 warps, ieee", 16, "ieee"), ("8 warps, tf32x3", 8, "tf32x3")],
    "bfloat16": [("8 warps", 8, None), ("16 warps", 16, None)],
}

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}  # relative to the scores' spread


@contextlib.contextmanager
def launched_as(warps: int, precision: str | None):
    chosen_warps, chosen_precision = kernels_m3el.warps_for, kernels_m3el.FLOAT32_PRECISION
    kernels_m3el.warps_for = lambda *_: warps
    kernels_m3el.FLOAT32_PRECISION = precision or chosen_precision
    try:
        yield
    finally:
        kernels_m3el.warps_for, kernels_m3el.FLOAT32_PRECISION = chosen_warps, chosen_precision


def compare(index, model, mentions, gold_ids, device, dtype: str, with_variants: bool) -> tuple[dict, list[dict]]:
    os.environ[KERNEL_ENV] = "torch"
    reference, torch_seconds = timed(lambda: index.scores(model, mentions), device)
    reference_ranks = index.rank(model, mentions, gold_ids)
    spread = float(reference.float().std())

    def run(with_ranks: bool = True) -> dict:
        index.scores(model, mentions)  # compiles
        fused, seconds = timed(lambda: index.scores(model, mentions), device)
        result = {"max_abs_diff": float((fused.float() - reference.float()).abs().max()), "kernel_ms": 1000 * seconds}
        if with_ranks:  # the masked grid of the pruned ranker: a second compilation
            ranks = index.rank(model, mentions, gold_ids)
            result["ranks_equal"] = float((ranks == reference_ranks).float().mean())
        return result

    os.environ[KERNEL_ENV] = "triton"  # forced: a failure raises instead of falling back
    try:
        result = {**run(), "score_spread": spread, "torch_ms": 1000 * torch_seconds}
        variants = []
        for label, warps, precision in VARIANTS[dtype] if with_variants else ():
            try:
                with launched_as(warps, precision):  # ranks only where the products differ (not just the warps)
                    variants.append({"variant": label, **run(with_ranks=precision not in (None, "ieee"))})
            except Exception as error:  # a variant that does not compile is reported, not a failed check
                variants.append({"variant": label, "error": f"{type(error).__name__}: {str(error)[:200]}"})
    finally:
        os.environ[KERNEL_ENV] = "auto"
    return result, variants


def main(argv=None) -> int:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), sizes="4096")
    parser.add_argument("--mentions", type=int, default=64)
    parser.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                        help="time the launch variants too (default: on CUDA; Triton's interpreter ignores them)")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes, args.mentions = "tiny", "40", 4
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    rows, variant_rows, results, ok = [], [], [], True
    for num_entities in parse_sizes(args.sizes):
        generator = generator_for(device, args.seed + num_entities)
        entities = random_features(model.config, num_entities, device, generator)
        gold = torch.randint(0, num_entities, (args.mentions,), generator=generator, device=device)
        noise = random_features(model.config, args.mentions, device, generator)
        mentions = M3ELFeatures(**{k: entities[k][gold] + noise[k] for k in entities.keys()})
        ids = [f"E{i}" for i in range(num_entities)]
        gold_ids = [ids[g] for g in gold.tolist()]
        index = EntityIndex.from_features(model, entities, ids)
        for dtype in ("float32", "bfloat16"):
            # The kernel is forced (a failure raises); a fallback warning would be a failure too. Other warnings
            # (Triton's own, for one) are shown, not turned into failures.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    result, variants = compare(
                        index.to(dtype=getattr(torch, dtype)), model, mentions, gold_ids, device, dtype,
                        device.type == "cuda" if args.variants is None else args.variants,
                    )
                except Exception as error:
                    print(f"{dtype}: the kernel failed: {type(error).__name__}: {error}", file=sys.stderr)
                    result = None
            for warning in caught:
                print(f"{dtype}: warning: {warning.category.__name__}: {warning.message}", file=sys.stderr)
            if result is None or any(FALLBACK in str(warning.message) for warning in caught):
                ok = False
                continue
            agrees = result["max_abs_diff"] <= TOLERANCE[dtype] * result["score_spread"]
            ok &= agrees and (dtype != "float32" or result["ranks_equal"] == 1.0)
            results.append({"entities": num_entities, "dtype": dtype, **result, "agrees": agrees, "variants": variants})
            rows.append([f"{num_entities:,}", dtype, f"{result['max_abs_diff']:.2e}", f"{result['score_spread']:.2f}",
                         f"{100 * result['ranks_equal']:.1f}%", f"{result['torch_ms']:.1f}",
                         f"{result['kernel_ms']:.1f}", "yes" if agrees else "NO"])
            for variant in variants:
                if "error" in variant:
                    variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], "failed", variant["error"],
                                         "-"])
                    continue
                ranks = f"{100 * variant['ranks_equal']:.1f}%" if "ranks_equal" in variant else "-"
                variant_rows.append([f"{num_entities:,}", dtype, variant["variant"], f"{variant['kernel_ms']:.1f}",
                                     f"{variant['max_abs_diff']:.2e}", ranks])
    print(f"# Fused G2L kernel vs PyTorch: {args.model} model, {args.mode}, {args.mentions} mentions; {machine(device)}")
    print(f"# launch: float32 products {kernels_m3el.FLOAT32_PRECISION}, warps by kernels_m3el.warps_for")
    print(markdown_table(["entities", "index dtype", "max abs(kernel - torch)", "score spread (std)",
                          "pruned ranks equal", "scores() torch ms", "scores() kernel ms", "agrees"], rows))
    if variant_rows:
        print("\nLaunch variants (the same scores() call):\n")
        print(markdown_table(["entities", "index dtype", "variant", "scores() kernel ms", "max abs(kernel - torch)",
                              "pruned ranks equal"], variant_rows))
    write_json(args.json, {"machine": machine(device), "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
