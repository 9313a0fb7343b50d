"""Where the exact ranker's time goes: `torch.profiler` over one `EntityIndex.scores` call (every pair) and one
`EntityIndex.rank` call (pruned) per index dtype, the device time of every kernel summed by name, the fused G2L
kernels' share of the call, and their rate: (mention, entity) pairs per second and microseconds per program step
(one mention against one program's tile of entities, per SM; for `rank`, the steps its pruned path ran).

    python benchmarks/profile_ranking.py --device cuda --model b32 --sizes 32768 --mentions 128
    python benchmarks/profile_ranking.py --check                                # CPU, tiny: the PyTorch path
"""

import argparse
import contextlib
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import add_common_arguments, add_launch_argument, add_noise_argument, apply_launch, apply_threads
from common import build_model, default_noise, feature_shapes, machine, markdown_table, parse_sizes
from common import random_kb_with_mentions, synchronize, timed, write_json

from modeling_m3el import kernels_m3el
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.modeling_m3el import M3ELModel

FUSED = ("_g2l_grid_kernel", "_g2l_candidates_kernel")  # the fused kernels' names (the grid's; the pruned pairs')


def device_times(prof, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, total microseconds on the device (CPU: self CPU time), calls) of every operation, longest first."""
    rows = []
    for event in prof.key_averages():
        total = event.self_device_time_total if cuda else event.self_cpu_time_total
        if total > 0:
            rows.append((event.key, total, event.count))
    return sorted(rows, key=lambda row: -row[1])


@contextlib.contextmanager
def phase_timers(model: M3ELModel, device):
    """
    Time the pruned ranker's phases while inside: yields a dict, phase -> seconds, each phase's time exclusive of
    the phases it calls (the device drained at every boundary, so the phases add up to a little more than an untimed
    call). The phases are the methods `rank` and `topk` call, wrapped for the duration.
    """
    totals: dict[str, float] = {}
    nested: list[float] = []  # per open phase: the time of the phases it called

    def timed_phase(original, label):
        def call(*args, **kwargs):
            name = label(*args, **kwargs)
            synchronize(device)
            nested.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                synchronize(device)
                elapsed = time.perf_counter() - start
                totals[name] = totals.get(name, 0.0) + elapsed - nested.pop()
                if nested:
                    nested[-1] += elapsed
        return call

    def needed_label(*args, **kwargs):  # EntityIndex._score_needed(self, model, mentions, start, stop, needed, budget,
        block = kwargs.get("block", args[7] if len(args) > 7 else None)  # block=None, known=None)
        return f"G2L block `{block}` of the pairs to refine" if block else "the undecided pairs (and gold) in full"

    wrapped = [
        (model, "mention_spans", lambda *a, **k: "mention spans (float64 QR)"),
        (model, "score_bounds", lambda *a, **k: "bounds (dot products, G2L intervals)"),
        (EntityIndex, "_refine", lambda *a, **k: "refinement's bookkeeping (narrowed bounds)"),
        (EntityIndex, "_score_needed", needed_label),
        (EntityIndex, "_score_pairs",
         lambda *a, **k: "pairs gathered, by PyTorch (the gold pairs; without the kernel, all)"),
        (EntityIndex, "_count_steps", lambda *a, **k: "counting program steps (stats only)"),
    ]
    originals = [getattr(owner, name) for owner, name, _ in wrapped]  # the class's functions, the model's methods
    for (owner, name, label), original in zip(wrapped, originals):
        setattr(owner, name, timed_phase(original, label))
    try:
        yield totals
    finally:
        for (owner, name, _), original in zip(wrapped, originals):
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the instance attribute goes; the class's method shows again


def print_phases(row: dict, call, model: M3ELModel, device, seconds: float) -> None:
    """One more `rank` call with `phase_timers`: each phase's time and share of the untimed call, into `row` too."""
    timed_wall = time.perf_counter()
    with phase_timers(model, device) as phases:
        call()
        synchronize(device)
    timed_wall = time.perf_counter() - timed_wall
    phases["the rest (masks, comparisons, lists)"] = timed_wall - sum(phases.values())
    row["phases_ms"] = {phase: 1000 * value for phase, value in phases.items()}
    print(f"\nrank() by phase (one more call, the device drained between phases: {1000 * timed_wall:.1f} ms in all, "
          f"untimed {1000 * seconds:.1f} ms):\n")
    print(markdown_table(["phase", "ms", "share"], [[phase, f"{1000 * value:.2f}", f"{100 * value / timed_wall:.1f}%"]
                                                    for phase, value in sorted(phases.items(), key=lambda p: -p[1])]))


def grid_steps(model: M3ELModel, num_entities: int, num_mentions: int, dtype: torch.dtype) -> int:
    """Program steps of the fused kernel for one full grid of every G2L block: (programs) x (mentions each)."""
    steps = 0
    shapes = feature_shapes(model.config)
    for lq in (shapes["text_tokens"][0], shapes["image_tokens"][0]):
        constants, _ = kernels_m3el.launch_parameters(lq, lq, model.config.matching_dim, dtype, False)
        steps += -(-num_entities // constants["BLOCK_E"]) * num_mentions
    return steps


def main(argv=None) -> int:
    parser = add_noise_argument(add_launch_argument(add_common_arguments(
        argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), sizes="32768")))
    parser.add_argument("--mentions", type=int, default=128)
    parser.add_argument("--top", type=int, default=8, help="operations listed per call")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes, args.mentions = "tiny", "300", 8
    apply_threads(args.threads)
    apply_launch(args.launch)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    model = build_model(args.model, args.mode, device, args.seed)
    print(f"# Exact ranker profile: {args.model} model, {args.mode}, {args.mentions} mentions (noise "
          f"{default_noise(args.model, args.noise):g}); {machine(device)}")
    print(f"# fused-kernel launch: {kernels_m3el.LAUNCH}")
    results = []
    for num_entities in parse_sizes(args.sizes):
        base, mentions, gold_ids = random_kb_with_mentions(model, num_entities, args.mentions, device, args.seed,
                                                           default_noise(args.model, args.noise))
        for dtype in (torch.float32, torch.bfloat16):
            index = base.to(dtype=dtype)
            calls = {
                "scores": lambda index=index: index.scores(model, mentions),
                "rank": lambda index=index: index.rank(model, mentions, gold_ids, stats=stats),
            }
            for name, call in calls.items():
                stats: dict = {}
                call()  # compiles and warms up
                _, seconds = timed(call, device)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof:
                    call()
                    if cuda:
                        torch.cuda.synchronize(device)
                times = device_times(prof, cuda)
                fused_us = sum(total for key, total, _ in times if any(kernel in key for kernel in FUSED))
                # rank: the pairs scored in full, plus those refined by one G2L block counted as half a pair
                scored = (stats["scored"] + stats.get("refined", 0) / 2) / stats["pairs"] if name == "rank" else 1
                pairs = args.mentions * num_entities * scored
                row = {"entities": num_entities, "dtype": str(dtype).removeprefix("torch."), "call": name,
                       "wall_ms": 1000 * seconds, "fused_ms": fused_us / 1000, "pairs_scored": pairs,
                       "operations": [{"name": key, "ms": total / 1000, "calls": count}
                                      for key, total, count in times[: args.top]]}
                if fused_us > 0 and cuda:
                    sms = torch.cuda.get_device_properties(device).multi_processor_count
                    # the program steps the kernels ran: every pair's for scores(); for rank(), as the ranker
                    # counted them for the path it took (EntityIndex.pruned_scoring)
                    steps = grid_steps(model, num_entities, args.mentions, dtype)
                    if name == "rank":
                        steps = stats["steps_candidates" if index.pruned_scoring == "candidates" else "steps_grid"]
                    row["fused_pairs_per_s"] = pairs / (fused_us / 1e6)
                    row["program_steps"] = steps
                    row["us_per_step_per_sm"] = fused_us * sms / steps
                results.append(row)
                share = f"{100 * row['fused_ms'] / row['wall_ms']:.0f}%" if row["fused_ms"] else "-"
                print(f"\n## {num_entities:,} entities, {row['dtype']} index, {name}(): {row['wall_ms']:.1f} ms wall, "
                      f"fused kernel {row['fused_ms']:.1f} ms ({share})"
                      + (f", {row['fused_pairs_per_s']:.3g} pairs/s, {row['us_per_step_per_sm']:.2f} us per program "
                         f"step per SM ({row['program_steps']:,} steps)" if "fused_pairs_per_s" in row else "")
                      + (f"; pruned pairs by the {index.pruned_scoring} kernel" if name == "rank" and index._fused()
                         else "")
                      + (f"; {100 * stats['scored'] / stats['pairs']:.1f}% of the pairs scored, "
                         f"{100 * stats.get('refined', 0) / stats['pairs']:.1f}% refined by one G2L block" if stats
                         else "")
                      + "\n")
                print(markdown_table(["operation", "device ms" if cuda else "CPU ms (self)", "calls"],
                                     [[key[:70], f"{total / 1000:.2f}", count] for key, total, count in
                                      times[: args.top]]))
                if name == "rank":
                    print_phases(row, call, model, device, seconds)
    write_json(args.json, {"machine": machine(device), "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
