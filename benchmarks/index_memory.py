"""Memory of an `EntityIndex` at a given KB size, against the raw features the authors' evaluation keeps on the host.

The index's size depends only on the widths of the model and the number of entities, not on the device or the
weights, so this runs anywhere: random features of the right shapes, `EntityIndex.from_features` in the requested
dtype, and the bytes counted (checked against the per-entity sizes of every tensor the index holds).

    python benchmarks/index_memory.py --model b32 --sizes 109976 --dtypes float32,bfloat16
"""

import argparse
import sys

import torch

from common import add_common_arguments, apply_threads, build_model, gib, machine, markdown_table, write_json
from common import generator_for, random_features

from modeling_m3el.index_m3el import EntityIndex


def main(argv=None) -> int:
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), sizes="109976")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--piece", type=int, default=4096, help="entities prepared at a time")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes = "tiny", "1000"
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    rows, results = [], []
    for num_entities in (int(float(s)) for s in args.sizes.split(",")):
        generator = generator_for(device, args.seed)
        # The raw features the authors' loop keeps, per entity, in float32 (what `encode` returns).
        one = random_features(model.config, 1, device, generator)
        raw_bytes = num_entities * sum(v[0].numel() * 4 for v in one.values())
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            pieces = []
            with torch.no_grad():
                for start in range(0, num_entities, args.piece):
                    count = min(args.piece, num_entities - start)
                    features = random_features(model.config, count, device, generator)
                    piece = EntityIndex.from_features(model, features, [f"E{start + i}" for i in range(count)],
                                                      dtype=dtype)
                    pieces.append(piece.tensors)
            tensors = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
            index = EntityIndex(tensors, [f"E{i}" for i in range(num_entities)], "memory-benchmark")
            per_entity = {name: t[0].numel() for name, t in tensors.items()}
            expected = num_entities * sum(per_entity.values()) * torch.finfo(dtype).bits // 8
            assert index.nbytes == expected, (index.nbytes, expected)
            results.append({"entities": num_entities, "dtype": dtype_name, "index_bytes": index.nbytes,
                            "raw_float32_bytes": raw_bytes, "values_per_entity": per_entity})
            rows.append([f"{num_entities:,}", dtype_name, f"{index.nbytes / 2**30:.3f} GiB",
                         f"{sum(per_entity.values()):,}", gib(raw_bytes), f"{raw_bytes / index.nbytes:.1f}x"])
            print(f"{dtype_name}: " + ", ".join(f"{k} {v}" for k, v in per_entity.items()), flush=True)
            del pieces, tensors, index
    print(f"# Entity index memory: {args.model} model, {args.mode}; {machine(device)}")
    print(markdown_table(["KB entities", "index dtype", "index", "values per entity", "raw features (fp32)",
                          "raw / index"], rows))
    write_json(args.json, {"machine": machine(device), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
