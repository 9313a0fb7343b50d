"""HNSW's parameters on a trained model and a saved index: how often stage 1 (`TwoStageRetriever(backend="hnsw")`)
keeps the exhaustive search's best estimate and the exact top-1 among its K candidates, its build time and its
search time, for each graph width `M`, construction breadth `efConstruction` and search breadth `efSearch`.

    python benchmarks/scaled_demo_kb.py --data m3el-demo-data --entities 100000 --output m3el-demo-100k
    m3el index --model m3el-demo/model --data m3el-demo-100k --output m3el-demo-100k/index --device cpu
    python benchmarks/hnsw_sweep.py --model m3el-demo/model --data m3el-demo-100k --index m3el-demo-100k/index
"""

import argparse
import time

import torch

from common import apply_threads, machine, markdown_table, write_json

from modeling_m3el import M3ELModel, M3ELProcessor
from modeling_m3el.data import load_benchmark
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.retrieval import CandidateRecall, TwoStageRetriever


def integers(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained M3EL folder")
    parser.add_argument("--data", required=True, help="a benchmark folder with the mentions")
    parser.add_argument("--index", required=True, help="the KB's index, saved by m3el index")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=10, help="candidates per mention")
    parser.add_argument("--m", default="32", help="comma-separated graph widths M")
    parser.add_argument("--ef-construction", default="80,200", help="comma-separated efConstruction values")
    parser.add_argument("--ef-search", default="64,400", help="comma-separated efSearch values (at least K is used)")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact top-1 over the whole KB (slow on a "
                        "CPU: every entity scored in full for every mention)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    apply_threads(args.threads)

    model = M3ELModel.from_pretrained(args.model).eval()
    processor = M3ELProcessor.from_pretrained(args.model)
    index = EntityIndex.load(args.index, model)
    mentions = load_benchmark(args.data, splits=[args.split]).splits[args.split]
    with torch.no_grad():
        features = model.encode(**processor.process_mentions(mentions["mention"], mentions["sentence"],
                                                             mentions["image"]))
    flat = TwoStageRetriever(index, model, k_candidates=args.k, backend="flat", check_model=False)
    best_estimate = flat.candidates(features, 1)[1][:, 0]
    exact_top1 = None if args.no_exact else index.topk(model, features, k=1)[1][:, 0]
    exact_in_flat = None if exact_top1 is None else CandidateRecall.of(flat.candidates(features)[1], exact_top1)
    del flat
    results, rows = [], []
    for width in integers(args.m):
        for construction in integers(args.ef_construction):
            start = time.perf_counter()
            retriever = TwoStageRetriever(index, model, k_candidates=args.k, backend="hnsw", hnsw_m=width,
                                          hnsw_ef_construction=construction, check_model=False)
            build_seconds = time.perf_counter() - start
            for search in integers(args.ef_search):
                retriever.hnsw_ef_search = search
                retriever.candidates(features)  # warm-up: the timed search is not the first over a new graph
                start = time.perf_counter()
                _, candidates = retriever.candidates(features)
                search_ms = 1000 * (time.perf_counter() - start) / len(mentions)
                estimate = CandidateRecall.of(candidates, best_estimate)
                exact = None if exact_top1 is None else CandidateRecall.of(candidates, exact_top1)
                results.append({"m": width, "ef_construction": construction, "ef_search": max(search, args.k),
                                "k": args.k, "best_estimate_kept": estimate.recall,
                                "exact_top1_among_k": None if exact is None else exact.recall,
                                "build_s": build_seconds, "search_ms_per_mention": search_ms})
                rows.append([width, construction, max(search, args.k), f"{100 * estimate.recall:.1f}%",
                             "-" if exact is None else f"{100 * exact.recall:.1f}%", f"{build_seconds:.1f} s",
                             f"{search_ms:.3f} ms"])
            del retriever
    run = machine(torch.device("cpu"))
    print(f"{args.model}, {len(index)} entities ({args.index}), {len(mentions)} {args.split} mentions, K = {args.k}; "
          f"{run}")
    if exact_in_flat is not None:
        print(f"exhaustive stage 1 (flat): the exact top-1 among its K for {100 * exact_in_flat.recall:.1f}%")
    print(markdown_table(["M", "efConstruction", "efSearch", "flat's best estimate kept", "exact top-1 among the K",
                          "build", "search per mention"], rows))
    write_json(args.json, {
        "benchmark": "hnsw_sweep", "machine": run, "args": vars(args), "entities": len(index),
        "mentions": len(mentions), "exact_top1_among_flat_k": None if exact_in_flat is None else exact_in_flat.recall,
        "results": results,
    })


if __name__ == "__main__":
    main()
