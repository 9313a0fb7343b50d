"""Two-stage retrieval: mentions/s end to end (dense vectors, stage-1 search, exact re-scoring of the K candidates,
top-k) and how often the exact top-1 over the whole KB is among the K candidates.

A KB of random entity features (made batch by batch on the device, so a million entities never exist as raw
features) and a model with random weights. Mentions are noisy copies of random entities (`--noise`; a negative
value: independent random mentions).

    python benchmarks/bench_two_stage.py --model tiny --sizes 2000,10000                        # CPU
    python benchmarks/bench_two_stage.py --model b32 --sizes 100000 --backends torch,ivf --device cuda

Stage 1 searches `M3ELModel.score_estimate` (the dot-product parts of the score and the G2L parts' centres): by
`TwoStageRetriever`'s backends (flat, ivf, hnsw: faiss; torch: matrix products) over its vectors, or `estimate`:
`EntityIndex.topk(candidates=K)`, the pipeline's `candidates`, over the index's own tensors.
"""

import argparse
import sys

import torch

from common import (
    DTYPES,
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
from modeling_m3el.index_m3el import EntityIndex, model_fingerprint
from modeling_m3el.retrieval import CandidateRecall, TwoStageRetriever

MAX_K_FRACTION = 0.02  # the bound: K at most 2% of the KB


@torch.no_grad()
def random_index(model, num_entities: int, device, dtype, generator, keep_rows: torch.Tensor, batch: int = 8192):
    """
    An index of random entities, prepared batch by batch on the device (what `EntityIndex.build` keeps), and the
    raw features of the entities at `keep_rows`, in that order (to make mentions from).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    kept: dict[str, torch.Tensor] = {}
    keep_rows = keep_rows.to(device)
    for start in range(0, num_entities, batch):
        features = random_features(model.config, min(batch, num_entities - start), device, generator)
        inside = (keep_rows >= start) & (keep_rows < start + batch)
        for name, tensor in features.items():
            kept.setdefault(name, torch.zeros((len(keep_rows), *tensor.shape[1:]), device=device))
            kept[name][inside] = tensor[keep_rows[inside] - start]
        for branch, part in model.prepare_entities(features).items():
            for name, tensor in part.items():
                parts.setdefault(f"{branch}.{name}", []).append(tensor.to(dtype))
    tensors = {name: torch.cat(pieces) for name, pieces in parts.items()}
    index = EntityIndex(tensors, [f"E{i}" for i in range(num_entities)], model_fingerprint(model))
    return index, M3ELFeatures(**kept)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_launch_argument(add_common_arguments(parser, sizes="2000,10000"))
    parser.add_argument("--backends", default="flat,ivf,hnsw,estimate",
                        help="comma-separated: flat, ivf, hnsw, torch, estimate")
    parser.add_argument("--k", default="0.5%,2%", help="comma-separated K: entity counts or percentages of the KB "
                        f"(at most {100 * MAX_K_FRACTION:g}%%)")
    parser.add_argument("--mentions", type=int, default=None, help="mentions per timing (default 256 on GPU, 64 "
                        "on CPU)")
    parser.add_argument("--mention-batch", type=int, default=None, help="mentions per search call (default: 256 on "
                        "GPU, 32 on CPU)")
    parser.add_argument("--index-dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--use-gpu-faiss", action="store_true", help="faiss indexes on the GPU (needs faiss-gpu)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(E))")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF cells searched (default nlist / 8)")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-search", type=int, default=None, help="default: the retriever's, max(256, K)")
    add_noise_argument(parser, "; negative: independent random mentions")
    parser.add_argument("--memory-budget-mib", type=float, default=None, help="exact ranker and re-scoring memory "
                        "budget (default: 2048 on GPU, 16 on CPU)")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.check:
        args.sizes, args.mentions, args.k = "600", 8, "2%"
    args.sizes = parse_sizes(args.sizes)
    args.noise = default_noise(args.model, args.noise)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.mentions = args.mentions or (256 if gpu else 64)
    args.mention_batch = args.mention_batch or (256 if gpu else 32)
    args.memory_budget = int((args.memory_budget_mib or (2048 if gpu else 16)) * 2**20)
    return args


def k_values(spec: str, num_entities: int) -> list[int]:
    values = []
    for item in spec.split(","):
        item = item.strip()
        k = round(float(item[:-1]) / 100 * num_entities) if item.endswith("%") else int(item)
        if k > MAX_K_FRACTION * num_entities + 1e-9:
            print(f"note: K={k} is over {100 * MAX_K_FRACTION:g}% of {num_entities} entities", file=sys.stderr)
        values.append(max(1, k))
    return sorted(set(values))


@torch.no_grad()
def in_batches(fn, mentions: M3ELFeatures, batch: int):
    outputs = []
    for start in range(0, mentions.text_embeds.shape[0], batch):
        outputs.append(fn(M3ELFeatures(**{k: v[start : start + batch] for k, v in mentions.items()})))
    return outputs


def run(args) -> dict:
    apply_threads(args.threads)
    apply_launch(args.launch)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    dtype = DTYPES[args.index_dtype]
    results = []
    for num_entities in args.sizes:
        generator = generator_for(device, args.seed + num_entities)
        sources = torch.randint(0, num_entities, (args.mentions,), generator=generator, device=device)
        (index, copied), build_seconds = timed(
            lambda: random_index(model, num_entities, device, dtype, generator, sources), device
        )
        noise = random_features(model.config, args.mentions, device, generator)
        if args.noise < 0:  # independent random mentions
            mentions = noise
        else:  # noisy copies of random entities, as a mention resembles its entity
            mentions = M3ELFeatures(**{k: copied[k] + args.noise * noise[k] for k in noise.keys()})
        del copied, noise
        budget = args.memory_budget
        # Exact top-1 over the whole KB (also the exact ranker's speed at this size, for comparison).
        in_batches(lambda m: index.topk(model, m, k=1, memory_budget_bytes=budget), _head(mentions, 2), 2)
        exact, exact_seconds = best_of(
            lambda: in_batches(lambda m: index.topk(model, m, k=1, memory_budget_bytes=budget), mentions,
                               args.mention_batch),
            device,
            args.repeat,
        )
        exact_top1 = torch.cat([rows[:, 0] for _, rows, _ in exact])
        for backend in args.backends:
            retriever, retriever_seconds = (None, 0.0) if backend == "estimate" else timed(
                lambda: TwoStageRetriever(
                    index, model, k_candidates=1, backend=backend, use_gpu=args.use_gpu_faiss, nlist=args.nlist,
                    nprobe=args.nprobe, hnsw_m=args.hnsw_m, hnsw_ef_search=args.hnsw_ef_search,
                    memory_budget_bytes=budget, check_model=False,
                ),
                device,
            )
            for k in k_values(args.k, num_entities):
                def search(m, k=k, top=10):
                    if retriever is None:
                        return index.topk(model, m, k=top, candidates=k, memory_budget_bytes=budget)
                    return retriever.search(m, k=top, k_candidates=k)
                in_batches(search, _head(mentions, 2), 2)  # warm-up
                found, seconds = best_of(lambda: in_batches(search, mentions, args.mention_batch), device, args.repeat)
                two_stage_top1 = torch.cat([rows[:, 0] for _, rows, _ in found])
                if retriever is None:  # all K candidates (untimed): is the exact top-1 among them?
                    candidates = torch.cat([rows for _, rows, _ in in_batches(
                        lambda m, k=k: search(m, k, top=k), mentions, args.mention_batch)])
                    recall = CandidateRecall.of(candidates, exact_top1)
                else:
                    recall = retriever.candidate_recall(mentions, k_candidates=k, exact_top1_rows=exact_top1)
                results.append({
                    "entities": num_entities,
                    "backend": backend,
                    "k": k,
                    "k_percent": 100 * k / num_entities,
                    "mentions": args.mentions,
                    "mentions_per_s": args.mentions / seconds,
                    "exact_mentions_per_s": args.mentions / exact_seconds,
                    "recall": recall.recall,
                    "top1_agrees": float((two_stage_top1.cpu() == exact_top1.cpu()).float().mean()),
                    "retriever_build_s": retriever_seconds,
                    "index_build_s": build_seconds,
                    "index_bytes": index.nbytes,
                    "nlist": retriever.nlist if backend == "ivf" else None,
                    "nprobe": retriever.nprobe if backend == "ivf" else None,
                })
            del retriever
        del index
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"benchmark": "two_stage", "machine": machine(device), "args": vars(args), "results": results}


def _head(features: M3ELFeatures, count: int) -> M3ELFeatures:
    return M3ELFeatures(**{k: v[:count] for k, v in features.items()})


def table(payload: dict) -> str:
    rows = []
    for r in payload["results"]:
        backend = r["backend"] + (f" (nlist {r['nlist']}, nprobe {r['nprobe']})" if r["backend"] == "ivf" else "")
        rows.append([
            f"{r['entities']:,}", backend, f"{r['k']:,} ({r['k_percent']:.2g}%)",
            f"**{r['mentions_per_s']:,.1f}**", f"{r['exact_mentions_per_s']:,.1f}",
            f"{100 * r['recall']:.1f}%", f"{100 * r['top1_agrees']:.1f}%",
            f"{r['retriever_build_s']:.1f} s", gib(r["index_bytes"]),
        ])
    header = ["KB entities", "stage 1", "K", "two-stage mentions/s", "exact ranker mentions/s",
              "exact top-1 among the K", "two-stage top-1 = exact top-1", "stage-1 build", "entity index"]
    return markdown_table(header, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    print(f"# Two-stage retrieval: {args.model} model, {args.mode}, index {args.index_dtype}, {args.mentions} "
          "mentions, "
          f"{payload['machine']}")
    print(table(payload))
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
