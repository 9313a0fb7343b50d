"""Half precision against float32 on a trained model (issue 4's "bf16 MRR within 0.001 of float32"): the exact
ranker's MR, MRR and Hits@1 on a benchmark split against the whole KB, with the index in float32 (the exact mode), the
index in bfloat16 or float16 (the fast mode, same float32 model and features), and model and index in bfloat16 or
float16; the share of mentions whose rank equals the float32 one, and which G2L path ran (on CUDA the fused kernels).
Exits 1 when a half-precision index's MRR (the ranker's fast mode: the same float32 model and mention features)
differs from the float32 MRR by more than `--max-mrr-difference` (0.001). bfloat16 keeps 8 significant bits (a
rounding step of 0.4%), float16 11 (0.05%). With the model in half precision too, the mentions themselves are encoded
in it (CLIP in bf16 or fp16), which moves every score by about that rounding: the mentions whose rank changes are
listed with their float32 margin (how far the gold led or trailed the entity it swapped with), which says whether
they were near ties.

The inputs (token ids, pixel values, gold entities) can be saved to one safetensors file (`--save-inputs`) and ranked
from it (`--inputs`) on a machine without the data or the `datasets` package (the GPU machines):

    accelerate launch train_accelerate.py                                    # the demo model, in m3el-demo/model
    python benchmarks/demo_precision.py --model m3el-demo/model --data m3el-demo-data
    python benchmarks/demo_precision.py --model m3el-demo/model --data m3el-demo-data \\
        --save-inputs m3el-demo/precision_inputs.safetensors
    python benchmarks/demo_precision.py --model m3el-demo/model --inputs m3el-demo/precision_inputs.safetensors \\
        --device cuda
"""

import argparse
import json
import sys

import torch
from safetensors.torch import load_file, save_file

from common import add_launch_argument, apply_launch, markdown_table, synchronize, write_json

from modeling_m3el import M3ELModel
from modeling_m3el.index_m3el import EntityIndex

INPUTS = ("input_ids", "attention_mask", "pixel_values")
CONFIGURATIONS = (("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16"), ("float32", "float16"),
                  ("float16", "float16"))  # (model, index)


def processed_inputs(model_folder: str, data: str, split: str) -> tuple[dict, list[str], list[str], dict]:
    """(entity and mention input tensors, keyed `entity.input_ids` ..., entity ids, gold entity ids, what they are)
    of a benchmark split, as `m3el eval` makes them (each entity with its first image)."""
    from modeling_m3el import M3ELProcessor
    from modeling_m3el.data import load_benchmark
    from modeling_m3el.evaluation import index_rows

    processor = M3ELProcessor.from_pretrained(model_folder)
    benchmark = load_benchmark(data, splits=[split])
    rows = index_rows(benchmark.entities)
    entities = processor.process_entities([r["name"] for r in rows], [r["description"] for r in rows],
                                          [r["image"] for r in rows])
    mentions = benchmark.splits[split]
    mention_inputs = processor.process_mentions(mentions["mention"], mentions["sentence"], mentions["image"])
    tensors = {f"{side}.{name}": inputs[name].contiguous() for side, inputs in (("entity", entities),
                                                                                ("mention", mention_inputs))
               for name in INPUTS}
    about = {"data": data, "split": split, "unreadable_images": processor.num_unreadable_images}
    return tensors, [str(r["id"]) for r in rows], [str(a) for a in mentions["answer"]], about


def save_inputs(path: str, tensors: dict, entity_ids: list[str], gold_ids: list[str], about: dict) -> None:
    save_file(tensors, path, metadata={"entity_ids": json.dumps(entity_ids), "gold_ids": json.dumps(gold_ids),
                                       "about": json.dumps(about)})


def load_inputs(path: str) -> tuple[dict, list[str], list[str], dict]:
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    missing = [key for key in ("entity_ids", "gold_ids") if key not in metadata]
    if missing:
        raise SystemExit(f"{path}: not a file of --save-inputs (no {', '.join(missing)} in its metadata)")
    return (load_file(path), json.loads(metadata["entity_ids"]), json.loads(metadata["gold_ids"]),
            json.loads(metadata.get("about", "{}")))


def ranking_figures(ranks: torch.Tensor) -> dict:
    """MR, MRR and Hits@1 (the package's metric module needs `evaluate` and `datasets`, which the GPU machines lack)."""
    ranks = ranks.double()
    return {"mr": float(ranks.mean()), "mrr": float((1 / ranks).mean()), "hits@1": float((ranks == 1).double().mean())}


@torch.no_grad()
def rank_with(model_folder: str, tensors: dict, entity_ids: list[str], gold_ids: list[str], model_dtype: str,
              index_dtype: str, device, batch_size: int, scores: bool = False) -> tuple:
    """Gold ranks of every mention with the model loaded in `model_dtype` and the index kept in `index_dtype`, which
    G2L path scored them, and with `scores` every (mention, entity) score (float32, on the CPU; else None)."""
    model = M3ELModel.from_pretrained(model_folder, dtype=getattr(torch, model_dtype)).to(device).eval()
    entities = {name: tensors[f"entity.{name}"] for name in INPUTS}
    index = EntityIndex.from_inputs(model, entities, entity_ids, dtype=getattr(torch, index_dtype))
    ranks, all_scores = [], []
    for start in range(0, len(gold_ids), batch_size):
        batch = {name: tensors[f"mention.{name}"][start : start + batch_size].to(device) for name in INPUTS}
        features = model.encode(**batch)
        ranks.append(index.rank(model, features, gold_ids[start : start + batch_size]).cpu())
        if scores:
            all_scores.append(index.scores(model, features).float().cpu())
    synchronize(device)
    return (torch.cat(ranks), "fused kernel" if index._fused() else "PyTorch",
            torch.cat(all_scores) if scores else None)


def rank_changes(ranks: torch.Tensor, reference: torch.Tensor, scores: torch.Tensor, gold: torch.Tensor) -> list:
    """The mentions whose rank differs from the reference's: (mention, reference rank, rank, the float32 margin of the
    gold over the best other entity, that margin relative to the gold's score)."""
    changes = []
    for mention in (ranks != reference).nonzero().flatten().tolist():
        row = scores[mention].clone()
        gold_score = float(row[gold[mention]])
        row[gold[mention]] = float("-inf")
        margin = gold_score - float(row.max())
        relative = margin / abs(gold_score) if gold_score else float("nan")
        changes.append((mention, int(reference[mention]), int(ranks[mention]), margin, relative))
    return changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trained M3EL folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="its benchmark folder")
    source.add_argument("--inputs", help="a file written by --save-inputs (instead of --data)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--save-inputs", help="write the split's processed inputs to this safetensors file and stop")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="mentions ranked per call")
    parser.add_argument("--max-mrr-difference", type=float, default=0.001)
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_launch_argument(parser)
    args = parser.parse_args(argv)
    apply_launch(args.launch)
    if args.data:
        tensors, entity_ids, gold_ids, about = processed_inputs(args.model, args.data, args.split)
        if args.save_inputs:
            save_inputs(args.save_inputs, tensors, entity_ids, gold_ids, about)
            print(f"{args.save_inputs}: {len(entity_ids)} entities, {len(gold_ids)} {args.split} mentions")
            return 0
    else:
        tensors, entity_ids, gold_ids, about = load_inputs(args.inputs)
    device = torch.device(args.device)
    results, rows, notes, reference = [], [], [], None
    position = {entity_id: row for row, entity_id in enumerate(entity_ids)}
    gold = torch.tensor([position[entity_id] for entity_id in gold_ids])
    for model_dtype, index_dtype in CONFIGURATIONS:
        ranks, path, scores = rank_with(args.model, tensors, entity_ids, gold_ids, model_dtype, index_dtype, device,
                                        args.batch_size, scores=reference is None)
        if reference is None:
            reference, reference_scores = ranks, scores
        changes = rank_changes(ranks, reference, reference_scores, gold)
        if changes:
            listed = "; ".join(f"mention {m}: rank {before} -> {after}, float32 margin {margin:+.4f} "
                               f"({100 * relative:+.2f}% of its score)"
                               for m, before, after, margin, relative in changes[:10])
            notes.append(f"model {model_dtype}, index {index_dtype}: {len(changes)} mention(s) ranked otherwise than "
                         f"in float32 ({listed}{'; ...' if len(changes) > 10 else ''})")
        figures = ranking_figures(ranks)
        difference = figures["mrr"] - ranking_figures(reference)["mrr"]
        same = float((ranks == reference).double().mean())
        results.append({"model_dtype": model_dtype, "index_dtype": index_dtype, "g2l": path, **figures,
                        "mrr_difference": difference, "ranks_equal_to_float32": same, "ranks": ranks.tolist(),
                        "rank_changes": [dict(zip(("mention", "float32_rank", "rank", "float32_margin",
                                                   "relative_margin"), change)) for change in changes]})
        rows.append([model_dtype, index_dtype, path, f"{figures['mr']:.4f}", f"{figures['mrr']:.5f}",
                     f"{figures['hits@1']:.4f}", f"{difference:+.5f}", f"{100 * same:.1f}%"])
    print(f"# {args.model} on {about.get('data', args.inputs)} {about.get('split', args.split)}: {len(gold_ids)} "
          f"mentions against {len(entity_ids)} entities; {device}")
    print(markdown_table(["model", "index", "G2L by", "MR", "MRR", "Hits@1", "MRR - float32's",
                          "ranks equal to float32's"], rows))
    for note in notes:
        print(f"\n{note}")
    write_json(args.json, {"model": args.model, "inputs": about, "device": str(device), "results": results})
    missed = [r for r in results
              if r["model_dtype"] == "float32" and abs(r["mrr_difference"]) > args.max_mrr_difference]
    for r in missed:
        print(f"the {r['index_dtype']} index's MRR differs from float32's by {abs(r['mrr_difference']):.5f} > "
              f"{args.max_mrr_difference}", file=sys.stderr)
    if missed:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
