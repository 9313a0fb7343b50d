"""Recall of two-stage retrieval on a trained model: how often the exact top-1 of a test mention is among the K
first-stage candidates, for K at most 2% of the KB (issue target: at least 99.5% of test mentions). Stage 1 by
`M3ELModel.score_estimate` (the dot-product parts and the G2L parts' centres): through the retriever's faiss backends,
or `estimate`, the candidates of `EntityIndex.topk(candidates=K)` and of the pipeline's `candidates`.

    accelerate launch train_accelerate.py                                   # the demo model, in m3el-demo/model
    python benchmarks/demo_candidate_recall.py --model m3el-demo/model --data m3el-demo-data
"""

import argparse
import math

from common import markdown_table, trained_model_on_split, write_json

from modeling_m3el.retrieval import CandidateRecall, TwoStageRetriever


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained M3EL folder")
    parser.add_argument("--data", required=True, help="its benchmark folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--fractions", default="0.005,0.01,0.02", help="K as fractions of the KB")
    parser.add_argument("--backends", default="flat,hnsw,estimate")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    model, benchmark, index, mentions, features = trained_model_on_split(args.model, args.data, args.split)
    exact_top1 = index.topk(model, features, k=1)[1][:, 0]
    rows, results = [], []
    for backend in args.backends.split(","):
        for fraction in (float(f) for f in args.fractions.split(",")):
            k = max(1, math.floor(fraction * len(index)))
            if backend == "estimate":
                recall = CandidateRecall.of(index.topk(model, features, k=k, candidates=k)[1], exact_top1)  # all K
            else:
                retriever = TwoStageRetriever(index, model, k_candidates=k, backend=backend)
                recall = retriever.candidate_recall(features, exact_top1_rows=exact_top1)
            hits, count = recall.hits, recall.count
            results.append({"backend": backend, "k": k, "fraction": fraction, "recall": hits / count,
                            "hits": hits, "count": count})
            rows.append([backend, f"{k} ({100 * k / len(index):.1f}%)", f"{100 * hits / count:.1f}%",
                         f"{hits}/{count}"])
    print(f"{args.model} on {benchmark.name} {args.split}: {len(mentions)} mentions, {len(index)} entities")
    print(markdown_table(["stage 1", "K", "exact top-1 among the K", "mentions"], rows))
    write_json(args.json, {"model": args.model, "data": args.data, "results": results})


if __name__ == "__main__":
    main()
