"""The `m3el` command: evaluate a saved model on a benchmark split, build an entity index, convert an authors'
checkpoint."""

import argparse
import json
import sys

DTYPES = ("float32", "bfloat16", "float16")


def _load_model(folder: str, dtype: str, device: str | None):
    import torch

    from . import M3ELModel, M3ELProcessor

    model = M3ELModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), M3ELProcessor.from_pretrained(folder)


def _eval(args) -> int:
    from .data import load_benchmark
    from .evaluation import gold_ranks, index_rows, ranking_metrics
    from .index_m3el import EntityIndex

    model, processor = _load_model(args.model, args.dtype, args.device)
    benchmark = load_benchmark(args.data, splits=[args.split])
    print(benchmark.summary(), file=sys.stderr)
    if args.index:
        index = EntityIndex.load(args.index, model, device=model.device)
        if index.entity_ids != list(benchmark.entities["id"]):
            raise SystemExit(f"error: the index in {args.index} does not hold the entities of {args.data}")
    else:
        index = EntityIndex.build(model, processor, index_rows(benchmark.entities), batch_size=args.entity_batch_size)
    ranks = gold_ranks(model, processor, index, benchmark.splits[args.split], batch_size=args.batch_size,
                       description=f"Ranking {args.split}")
    results = {"model": args.model, "data": args.data, "split": args.split, "entities": len(index),
               **ranking_metrics(ranks)}
    print(json.dumps(results, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _index(args) -> int:
    from .data import load_benchmark
    from .evaluation import index_rows
    from .index_m3el import EntityIndex

    model, processor = _load_model(args.model, args.dtype, args.device)
    benchmark = load_benchmark(args.data, splits=[])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), batch_size=args.entity_batch_size)
    index.save(args.output)
    print(f"{index} saved in {args.output}")
    return 0


def _convert(args) -> int:
    from .convert_official_checkpoint import main as convert_main

    return convert_main(args.convert_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3el", description="M3EL multimodal entity linking.")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_arguments(sub):
        sub.add_argument("--model", required=True, help="a saved M3EL folder (save_pretrained, or a training run's model/)")
        sub.add_argument("--data", required=True, help="a benchmark folder (release layout or JSON Lines)")
        sub.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="float32: exact ranking; bfloat16/float16: faster, approximate")
        sub.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
        sub.add_argument("--entity-batch-size", type=int, default=256)

    evaluate = commands.add_parser("eval", help="rank a split's gold entities against the whole KB: MR, MRR, Hits@k")
    model_arguments(evaluate)
    evaluate.add_argument("--split", default="test", help="train, dev or test (default: test)")
    evaluate.add_argument("--index", default=None, help="a saved entity index of this model and KB (else built)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="mentions per batch")
    evaluate.add_argument("--output", default=None, help="also write the results to this JSON file")
    evaluate.set_defaults(handler=_eval)

    index = commands.add_parser("index", help="encode a benchmark's KB into an entity index folder")
    model_arguments(index)
    index.add_argument("--output", required=True, help="folder for entity_index.safetensors and entity_index.json")
    index.set_defaults(handler=_index)

    convert = commands.add_parser(
        "convert", help="convert an authors' checkpoint (all arguments go to modeling_m3el.convert_official_checkpoint)",
        add_help=False,
    )
    convert.add_argument("convert_args", nargs=argparse.REMAINDER)
    convert.set_defaults(handler=_convert)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
