"""Pruning of the exact ranker on a trained model: the share of (mention, entity) pairs that `EntityIndex.rank` and
`EntityIndex.topk` score exactly (the rest is decided by the score bounds), and that the results equal scoring
every pair.

Random weights say little about how tight the bounds are on a trained model (they bound the G2L parts of the score,
whose size is learned); this script measures it on a model and its own benchmark.

    accelerate launch train_accelerate.py                                   # the demo model, in m3el-demo/model
    python benchmarks/demo_pruning.py --model m3el-demo/model --data m3el-demo-data
"""

import argparse
import sys

import torch

from common import markdown_table, trained_model_on_split, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained M3EL folder")
    parser.add_argument("--data", required=True, help="its benchmark folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", default="1,5,10", help="top-k sizes to measure")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    model, _, index, mentions, features = trained_model_on_split(args.model, args.data, args.split)
    results, rows = [], []
    stats = {}
    ranks = index.rank(model, features, mentions["answer"], stats=stats)
    same = torch.equal(ranks, index.rank(model, features, mentions["answer"], prune=False))
    results.append({"call": "rank", "scored_fraction": stats["scored"] / stats["pairs"],
                    "refined_fraction": stats["refined"] / stats["pairs"], "same_as_full": same})
    for k in (int(k) for k in args.k.split(",")):
        stats = {}
        values, entity_rows, _ = index.topk(model, features, k=k, stats=stats)
        full_values, full_rows, _ = index.topk(model, features, k=k, prune=False)
        same = torch.equal(entity_rows, full_rows) and torch.allclose(values, full_values, rtol=1e-5, atol=1e-5)
        results.append({"call": f"topk(k={k})", "scored_fraction": stats["scored"] / stats["pairs"],
                        "refined_fraction": stats["refined"] / stats["pairs"],
                        "same_as_full": same})
    for r in results:
        rows.append([r["call"], f"{100 * r['scored_fraction']:.1f}%", f"{100 * r['refined_fraction']:.1f}%",
                     "yes" if r["same_as_full"] else "NO"])
    print(f"{args.model} on {args.data} {args.split}: {len(mentions)} mentions, {len(index)} entities, "
          f"matching width {model.config.matching_dim}, {model.config.cross_modal}")
    print(markdown_table(["call", "pairs scored exactly", "pairs refined by one G2L block first",
                          "same result as scoring every pair"], rows))
    write_json(args.json, {"model": args.model, "data": args.data, "results": results})
    return 0 if all(r["same_as_full"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
