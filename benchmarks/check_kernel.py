"""The fused G2L kernel against the PyTorch path, same model and features: scores of every (mention, entity) pair
in float32 and bfloat16, the pruned ranks, and the time of one `EntityIndex.scores` call of each path (on CUDA also
the kernel's time with each warp count its launch chooses between, `kernels_m3el.warps_for`).

The first thing `run_gpu.sh` runs: it compiles the kernel and says whether it agrees before anything is timed.
Exits 1 when the kernel falls back, fails, or disagrees.

    python benchmarks/check_kernel.py --device cuda --model b32 --sizes 4096
    TRITON_INTERPRET=1 python benchmarks/check_kernel.py --device cpu --check     # Triton's interpreter, tiny
"""

import argparse
import os
import sys
import warnings

import torch

from common import add_common_arguments, apply_threads, build_model, generator_for, machine, markdown_table
from common import parse_sizes, random_features, timed, write_json

from modeling_m3el import M3ELFeatures
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el import kernels_m3el
from modeling_m3el.kernels_m3el import FALLBACK, KERNEL_ENV

WARPS = (8, 16)  # the warp counts `kernels_m3el.warps_for` chooses between at B/32 widths; each is timed

TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}  # relative to the scores' spread


def compare(index, model, mentions, gold_ids, device) -> dict:
    os.environ[KERNEL_ENV] = "torch"
    reference, torch_seconds = timed(lambda: index.scores(model, mentions), device)
    reference_ranks = index.rank(model, mentions, gold_ids)
    os.environ[KERNEL_ENV] = "triton"  # forced: a failure raises instead of falling back
    index.scores(model, mentions)  # compiles
    fused, kernel_seconds = timed(lambda: index.scores(model, mentions), device)
    ranks = index.rank(model, mentions, gold_ids)
    by_warps = {}
    if device.type == "cuda":  # the interpreter ignores warps
        chosen = kernels_m3el.warps_for
        try:
            for warps in WARPS:
                kernels_m3el.warps_for = lambda *_, warps=warps: warps
                index.scores(model, mentions)  # compiles
                by_warps[warps] = 1000 * timed(lambda: index.scores(model, mentions), device)[1]
        finally:
            kernels_m3el.warps_for = chosen
    os.environ[KERNEL_ENV] = "auto"
    spread = float(reference.float().std())
    return {
        "max_abs_diff": float((fused.float() - reference.float()).abs().max()),
        "score_spread": spread,
        "ranks_equal": float((ranks == reference_ranks).float().mean()),
        "torch_ms": 1000 * torch_seconds,
        "kernel_ms": 1000 * kernel_seconds,
        "kernel_ms_by_warps": by_warps,
    }


def main(argv=None) -> int:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), sizes="4096")
    parser.add_argument("--mentions", type=int, default=64)
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes, args.mentions = "tiny", "40", 4
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    rows, results, ok = [], [], True
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
                    result = compare(index.to(dtype=getattr(torch, dtype)), model, mentions, gold_ids, device)
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
            results.append({"entities": num_entities, "dtype": dtype, **result, "agrees": agrees})
            rows.append([f"{num_entities:,}", dtype, f"{result['max_abs_diff']:.2e}", f"{result['score_spread']:.2f}",
                         f"{100 * result['ranks_equal']:.1f}%", f"{result['torch_ms']:.1f}",
                         f"{result['kernel_ms']:.1f}",
                         " / ".join(f"{result['kernel_ms_by_warps'][w]:.1f}" for w in WARPS)
                         if result["kernel_ms_by_warps"] else "-",
                         "yes" if agrees else "NO"])
    print(f"# Fused G2L kernel vs PyTorch: {args.model} model, {args.mode}, {args.mentions} mentions; {machine(device)}")
    print(markdown_table(["entities", "index dtype", "max abs(kernel - torch)", "score spread (std)",
                          "pruned ranks equal", "scores() torch ms", "scores() kernel ms",
                          f"kernel ms at {' / '.join(map(str, WARPS))} warps", "agrees"], rows))
    write_json(args.json, {"machine": machine(device), "results": results})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
