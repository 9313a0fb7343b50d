"""Exact ranking: `EntityIndex.rank` against a naive reference that follows the authors' evaluation loop, same run.

The reference keeps every entity feature on the host in float32 (the full token tensors), copies chunks of 6,000
entities to the device for every batch of 20 mentions, re-runs the whole matcher on each chunk and materialises the
(entities, mentions, tokens, tokens) attention. The exact ranker runs twice: pruned (its default: entities whose
score bounds decide the comparison with the gold's score are not scored) and with every pair scored. Ranks must agree
exactly in float32. Models and features are random
(speed does not depend on their values); each mention is a noisy copy of its gold entity, so that gold ranks are
small, as in real evaluation.

    python benchmarks/bench_exact_ranking.py --model tiny --sizes 6000,20000          # CPU
    python benchmarks/bench_exact_ranking.py --model b32 --sizes 109976 --device cuda  # GPU
"""

import argparse
import sys

import torch

from common import (
    add_common_arguments,
    add_launch_argument,
    add_noise_argument,
    apply_launch,
    apply_threads,
    best_of,
    build_model,
    default_noise,
    generator_for,
    gib,
    machine,
    markdown_table,
    parse_sizes,
    random_features,
    timed,
    write_json,
)

from modeling_m3el import M3ELFeatures
from modeling_m3el.index_m3el import EntityIndex


# ------------------------------------------------------------------------------------------ naive reference


def naive_intra_modal(block, mention_cls, mention_tokens, entity_cls, entity_tokens):
    """G2L the straightforward way: the (E, B, Lx, Lx) attention and the (E, B, Lx, d) context materialised."""
    global_to_global = mention_cls @ entity_cls.T  # (B, E)
    query = block.query(entity_tokens)  # (E, Lx, d)
    key, value = block.key(mention_tokens), block.value(mention_tokens)  # (B, Lx, d)
    attention = torch.matmul(query.unsqueeze(1), key.transpose(1, 2).unsqueeze(0)) * block.scale  # (E, B, Lx, Lx)
    attention = attention.softmax(dim=-1)
    context = torch.matmul(attention, value.unsqueeze(0))  # (E, B, Lx, d)
    context = block.context_norm(context.mean(dim=2))  # (E, B, d)
    global_to_local = (context * block.global_proj(entity_cls).unsqueeze(1)).sum(dim=-1).T  # (B, E)
    return (global_to_global + global_to_local) / 2


def naive_matcher(model, mentions: dict, entities: dict) -> torch.Tensor:
    """The whole matcher on one batch of mentions and one chunk of entities, both sides recomputed: scores (B, E)."""
    normed = []
    for side in (mentions, entities):
        normed.append(
            M3ELFeatures(
                text_embeds=model.text_embeds_norm(side["text_embeds"]),
                text_tokens=model.text_tokens_norm(side["text_tokens"]),
                image_embeds=model.image_embeds_norm(side["image_embeds"]),
                image_tokens=model.image_tokens_norm(side["image_tokens"]),
            )
        )
    m, e = normed
    branches = []
    if model.text_matching is not None:
        branches.append(
            naive_intra_modal(model.text_matching, m.text_embeds, m.text_tokens, e.text_embeds, e.text_tokens)
        )
    if model.image_matching is not None:
        branches.append(
            naive_intra_modal(model.image_matching, m.image_embeds, m.image_tokens, e.image_embeds, e.image_tokens)
        )
    if model.cross_modal_matching is not None:
        mention_vectors, entity_vectors = model.cross_modal_matching(m), model.cross_modal_matching(e)
        branches += [mention_vectors[name] @ entity_vectors[name].T for name in mention_vectors]
    return sum(branches) / len(branches)


@torch.no_grad()
def naive_ranks(model, mentions_host: M3ELFeatures, entities_host: M3ELFeatures, gold: torch.Tensor, device,
                mention_batch: int = 20, entity_chunk: int = 6000) -> torch.Tensor:
    """The authors' loop: for every batch of 20 mentions, every chunk of 6,000 host entities goes to the device."""
    ranks = []
    num_mentions, num_entities = mentions_host.text_embeds.shape[0], entities_host.text_embeds.shape[0]
    for start in range(0, num_mentions, mention_batch):
        mentions = {k: v[start : start + mention_batch].to(device) for k, v in mentions_host.items()}
        scores = []
        for first in range(0, num_entities, entity_chunk):
            entities = {k: v[first : first + entity_chunk].to(device) for k, v in entities_host.items()}
            scores.append(naive_matcher(model, mentions, entities))
        scores = torch.cat(scores, dim=1)  # (b, E)
        gold_scores = scores.gather(1, gold[start : start + mention_batch, None].to(device))
        ranks.append((scores >= gold_scores).sum(dim=1).cpu())
    return torch.cat(ranks)


# ------------------------------------------------------------------------------------------------- exact


@torch.no_grad()
def exact_ranks(index: EntityIndex, model, mentions_host: M3ELFeatures, gold_ids, device, batch: int, budget: int,
                prune: bool = True, stats: dict | None = None):
    """`EntityIndex.rank` over `batch` mentions at a time; `stats` (a dict) sums the pairs scored exactly."""
    ranks = []
    for start in range(0, mentions_host.text_embeds.shape[0], batch):
        mentions = M3ELFeatures(**{k: v[start : start + batch].to(device) for k, v in mentions_host.items()})
        call = {}
        ranks.append(
            index.rank(model, mentions, gold_ids[start : start + batch], prune=prune, memory_budget_bytes=budget,
                       stats=call).cpu()
        )
        if stats is not None:
            for key, value in call.items():
                stats[key] = stats.get(key, 0) + value
    return torch.cat(ranks)


def mrr(ranks: torch.Tensor) -> float:
    return float((1.0 / ranks.double()).mean())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_launch_argument(add_common_arguments(parser, sizes="6000,20000"))
    parser.add_argument("--mentions", type=int, default=None, help="mentions the exact ranker ranks (default 256 on "
                        "GPU, 64 on CPU)")
    parser.add_argument("--naive-mentions", type=int, default=None, help="mentions the naive loop ranks, the first of "
                        "the exact ranker's (default 40): its ranks are compared")
    parser.add_argument("--full-mentions", type=int, default=None, help="mentions the exact ranker without pruning "
                        "ranks, the first of the pruned run's (default: as many as the naive loop)")
    parser.add_argument("--mention-batch", type=int, default=20, help="naive loop: mentions per batch (authors: 20)")
    parser.add_argument("--entity-chunk", type=int, default=6000, help="naive loop: entities per chunk (authors: 6000)")
    parser.add_argument("--exact-batch", type=int, default=None, help="exact ranker: mentions per call (default: 128 "
                        "on GPU, 16 on CPU)")
    parser.add_argument("--memory-budget-mib", type=float, default=None, help="exact ranker: attention memory per "
                        "entity chunk (default: 2048 on GPU, 16 on CPU)")
    parser.add_argument("--cpu-piece-mib", type=float, default=None, help="exact ranker on the CPU: the largest piece "
                        "its PyTorch path works in, whatever the budget (EntityIndex.cpu_piece_bytes; default 16)")
    parser.add_argument("--fast-dtype", default="bfloat16", help="the fast mode's index dtype ('none': skip)")
    parser.add_argument("--pruned-scoring", choices=("grid", "candidates"), default=None, help="how the pruned "
                        "ranker scores its undecided pairs through the fused kernel (EntityIndex.pruned_scoring)")
    parser.add_argument("--no-refine", action="store_true", help="the pruned ranker without its refinement (one "
                        "G2L block computed exactly for the undecided pairs first: EntityIndex.refine_bounds)")
    add_noise_argument(parser)
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.check:
        args.sizes, args.mentions, args.naive_mentions = "700", 12, 12
        args.entity_chunk = 300  # several naive chunks, the last one partial
    args.sizes = parse_sizes(args.sizes)
    args.noise = default_noise(args.model, args.noise)
    args.mentions = args.mentions or (256 if gpu else 64)
    args.naive_mentions = min(args.naive_mentions or 40, args.mentions)
    args.full_mentions = min(args.full_mentions or args.naive_mentions, args.mentions)
    args.exact_batch = args.exact_batch or (128 if gpu else 16)
    args.memory_budget = int((args.memory_budget_mib or (2048 if gpu else 16)) * 2**20)
    if min(args.mentions, args.naive_mentions, args.full_mentions, args.mention_batch, args.entity_chunk, args.exact_batch) <= 0:
        raise SystemExit("mention counts, batch and chunk sizes must be positive")
    return args


def run(args) -> dict:
    apply_threads(args.threads)
    apply_launch(args.launch)
    if args.pruned_scoring:
        EntityIndex.pruned_scoring = args.pruned_scoring
    EntityIndex.refine_bounds = not args.no_refine
    if args.cpu_piece_mib:
        EntityIndex.cpu_piece_bytes = int(args.cpu_piece_mib * 2**20)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    config = model.config
    results = []
    for num_entities in args.sizes:
        generator = generator_for(device, args.seed + num_entities)
        # Entity features on the host in float32, as the authors keep them; made on the device in pieces (fast).
        pieces = []
        for start in range(0, num_entities, 8192):
            piece = random_features(config, min(8192, num_entities - start), device, generator)
            pieces.append({k: v.cpu() for k, v in piece.items()})
        entities_host = M3ELFeatures(**{k: torch.cat([p[k] for p in pieces]) for k in pieces[0]})
        del pieces, piece
        gold = torch.randint(0, num_entities, (args.mentions,), generator=generator, device=device).cpu()
        noise = random_features(config, args.mentions, device, generator)
        mentions_host = M3ELFeatures(
            **{k: entities_host[k][gold] + args.noise * noise[k].cpu() for k in entities_host.keys()}
        )
        entity_ids = [f"E{i}" for i in range(num_entities)]
        gold_ids = [entity_ids[g] for g in gold.tolist()]

        index, build_seconds = timed(
            lambda: EntityIndex.from_features(model, entities_host, entity_ids, batch_size=8192, device=device), device
        )
        # Warm-up (kernels, allocator) on a few mentions, then the timed runs: pruned (the default) and full.
        exact_ranks(index, model, _head(mentions_host, 2), gold_ids[:2], device, args.exact_batch, args.memory_budget)
        stats = {}
        exact, exact_seconds = best_of(
            lambda: exact_ranks(index, model, mentions_host, gold_ids, device, args.exact_batch, args.memory_budget,
                                stats=stats),
            device,
            args.repeat,
        )
        full_mentions = _head(mentions_host, args.full_mentions)
        exact_ranks(index, model, _head(mentions_host, 2), gold_ids[:2], device, args.exact_batch, args.memory_budget,
                    prune=False)
        full, full_seconds = best_of(
            lambda: exact_ranks(index, model, full_mentions, gold_ids[: args.full_mentions], device, args.exact_batch,
                                args.memory_budget, prune=False),
            device,
            args.repeat,
        )
        naive_mentions = _head(mentions_host, args.naive_mentions)
        naive_ranks(model, _head(mentions_host, 1), _head(entities_host, min(num_entities, args.entity_chunk)),
                    torch.zeros(1, dtype=torch.long), device, 1, args.entity_chunk)
        naive, naive_seconds = best_of(
            lambda: naive_ranks(model, naive_mentions, entities_host, gold[: args.naive_mentions], device,
                                args.mention_batch, args.entity_chunk),
            device,
            args.repeat,
        )
        compared = exact[: args.naive_mentions]
        row = {
            "entities": num_entities,
            "exact_mentions": args.mentions,
            "naive_mentions": args.naive_mentions,
            "naive_mentions_per_s": args.naive_mentions / naive_seconds,
            "exact_mentions_per_s": args.mentions / exact_seconds,
            "speedup": (args.mentions / exact_seconds) / (args.naive_mentions / naive_seconds),
            "ranks_identical": bool(torch.equal(compared, naive)),
            "ranks_differing": int((compared != naive).sum()),
            "scored_fraction": stats["scored"] / stats["pairs"],
            "refined_fraction": stats.get("refined", 0) / stats["pairs"],
            # the fused kernels' program steps for the pairs left after the bounds (the refined block's included),
            # counted whichever path ran, against the steps of scoring every pair
            "steps_candidates_fraction": stats["steps_candidates"] / stats["steps_every_pair"],
            "steps_grid_fraction": stats["steps_grid"] / stats["steps_every_pair"],
            "full_mentions": args.full_mentions,
            "full_mentions_per_s": args.full_mentions / full_seconds,
            "full_speedup": (args.full_mentions / full_seconds) / (args.naive_mentions / naive_seconds),
            "full_ranks_identical": bool(torch.equal(full, exact[: args.full_mentions])),
            "mrr_float32": mrr(exact),
            "fused_g2l_kernel": index._fused(),
            "index_build_s": build_seconds,
            "index_bytes": index.nbytes,
            "naive_host_bytes": sum(v.numel() * v.element_size() for v in entities_host.values()),
        }
        if args.fast_dtype != "none":
            try:
                row.update(fast_mode(args, index, model, mentions_host, gold_ids, exact, device, row))
            except RuntimeError as error:  # keep the float32 figures when the fast mode fails on this machine
                row["fast_error"] = f"{type(error).__name__}: {error}"[:300]
                print(f"fast mode ({args.fast_dtype}) failed: {row['fast_error']}", file=sys.stderr)
        results.append(row)
        del index, entities_host
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"benchmark": "exact_ranking", "machine": machine(device), "args": vars(args), "results": results}


def fast_mode(args, index, model, mentions_host, gold_ids, exact, device, row) -> dict:
    """The same ranking from a copy of the index in `args.fast_dtype` (the model stays float32)."""
    fast_index = index.to(dtype=getattr(torch, args.fast_dtype))
    exact_ranks(fast_index, model, _head(mentions_host, 2), gold_ids[:2], device, args.exact_batch, args.memory_budget)
    stats = {}
    fast, fast_seconds = best_of(
        lambda: exact_ranks(fast_index, model, mentions_host, gold_ids, device, args.exact_batch, args.memory_budget,
                            stats=stats),
        device,
        args.repeat,
    )
    return {
        # (the fast dtype's tiles hold more entities: more pairs a step)
        "fast_steps_candidates_fraction": stats["steps_candidates"] / stats["steps_every_pair"],
        "fast_steps_grid_fraction": stats["steps_grid"] / stats["steps_every_pair"],
        "fast_dtype": args.fast_dtype,
        "fast_mentions_per_s": args.mentions / fast_seconds,
        "fast_speedup": (args.mentions / fast_seconds) / row["naive_mentions_per_s"],
        "fast_same_rank": float((fast == exact).float().mean()),
        "mrr_fast": mrr(fast),
        "fast_index_bytes": fast_index.nbytes,
    }


def _head(features: M3ELFeatures, count: int) -> M3ELFeatures:
    return M3ELFeatures(**{k: v[:count] for k, v in features.items()})


def table(payload: dict) -> str:
    args = payload["args"]
    fast = args["fast_dtype"] != "none"
    header = [
        "KB entities", f"naive mentions/s ({args['naive_mentions']} mentions)",
        f"exact fp32, every pair scored: mentions/s ({args['full_mentions']} mentions; speed-up)",
        f"exact fp32, pruned: mentions/s ({args['mentions']} mentions)", "speed-up",
        "pairs scored exactly (+ one G2L block alone)",
        "kernel steps after the bounds, candidates / masked grid (of every pair's)",
        "fp32 ranks identical to naive (full; pruned)",
    ]
    if fast:
        header += [f"{args['fast_dtype']} mentions/s (speed-up; same rank as fp32; kernel steps, candidates / grid)",
                   "MRR fp32 / fast"]
    else:
        header += ["MRR fp32"]
    header += ["index fp32" + (" / fast" if fast else ""), "naive host features (fp32)"]
    rows = []
    for r in payload["results"]:
        row = [
            f"{r['entities']:,}",
            f"{r['naive_mentions_per_s']:,.2f}",
            f"{r['full_mentions_per_s']:,.1f} ({r['full_speedup']:.1f}x)",
            f"{r['exact_mentions_per_s']:,.1f}",
            f"**{r['speedup']:.1f}x**",
            f"{100 * r['scored_fraction']:.2f}% (+{100 * r.get('refined_fraction', 0):.2f}%)",
            f"{100 * r['steps_candidates_fraction']:.2f}% / {100 * r['steps_grid_fraction']:.2f}%",
            ("yes" if r["full_ranks_identical"] else "NO")
            + "; "
            + ("yes" if r["ranks_identical"] else f"NO ({r['ranks_differing']} differ)"),
        ]
        if fast and "fast_error" in r:
            row += [f"failed: {r['fast_error'][:80]}", f"{r['mrr_float32']:.4f} / -", f"{gib(r['index_bytes'])} / -"]
        elif fast:
            row += [
                f"{r['fast_mentions_per_s']:,.1f} ({r['fast_speedup']:.1f}x; {100 * r['fast_same_rank']:.1f}%; "
                f"{100 * r['fast_steps_candidates_fraction']:.2f}% / {100 * r['fast_steps_grid_fraction']:.2f}%)",
                f"{r['mrr_float32']:.4f} / {r['mrr_fast']:.4f}",
                f"{gib(r['index_bytes'])} / {gib(r['fast_index_bytes'])}",
            ]
        else:
            row += [f"{r['mrr_float32']:.4f}", gib(r["index_bytes"])]
        row.append(gib(r["naive_host_bytes"]))
        rows.append(row)
    return markdown_table(header, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    on_cpu = torch.device(args.device).type == "cpu"
    print(f"# Exact ranking vs the authors' loop: {args.model} model, {args.mode}, {payload['machine']}")
    kernel = "the fused Triton kernel" if payload["results"] and payload["results"][0]["fused_g2l_kernel"] else "PyTorch"
    pieces = f" (on the CPU in pieces of at most {EntityIndex.cpu_piece_bytes / 2**20:g} MiB)" if on_cpu else ""
    print(f"# exact ranker: {args.exact_batch} mentions per call, {args.memory_budget / 2**20:.0f} MiB attention "
          f"budget{pieces}, G2L by {kernel}"
          + (f" (pruned: {EntityIndex.pruned_scoring})" if kernel != "PyTorch" else "")
          + ("" if EntityIndex.refine_bounds else ", bounds not refined") + "; "
          f"naive: {args.mention_batch} mentions per batch, {args.entity_chunk} entities per chunk")
    print(table(payload))
    write_json(args.json, payload)
    if not all(r["ranks_identical"] and r["full_ranks_identical"] for r in payload["results"]):
        print("ERROR: float32 ranks differ from the naive loop", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
