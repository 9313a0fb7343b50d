"""Entity encoding from preprocessed tensors: entities/s of the authors' path (encode a batch, keep every raw feature
on the host in float32) against `EntityIndex.from_inputs` (encode a batch, keep what the score needs), float32 and
a half-precision model.

Inputs are random token ids and pixel values on the host (pinned on GPU runs), moved to the device batch by batch
by both paths; the model has random weights (speed does not depend on their values).

    python benchmarks/bench_entity_encoding.py --model tiny --sizes 4096                  # CPU
    python benchmarks/bench_entity_encoding.py --model b32 --sizes 16384 --device cuda    # GPU
"""

import argparse
import copy
import sys

import torch

from common import (
    DTYPES,
    add_common_arguments,
    apply_threads,
    best_of,
    build_model,
    gib,
    machine,
    markdown_table,
    parse_sizes,
    timed,
    write_json,
)

from modeling_m3el import M3ELFeatures
from modeling_m3el.index_m3el import EntityIndex, model_fingerprint


def random_inputs(config, count: int, device, seed: int) -> dict[str, torch.Tensor]:
    """Preprocessed entity tensors on the host: token ids (count, L), all-ones mask, pixel values (count, 3, H, W)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    clip = config.clip_config
    size = clip.vision_config.image_size
    inputs = {
        "input_ids": torch.randint(
            0, clip.text_config.vocab_size, (count, config.text_max_length), generator=generator, device=device
        ),
        "attention_mask": torch.ones((count, config.text_max_length), dtype=torch.long, device=device),
        "pixel_values": torch.randn((count, 3, size, size), generator=generator, device=device),
    }
    host = {k: v.cpu() for k, v in inputs.items()}
    if torch.device(device).type == "cuda":
        host = {k: v.pin_memory() for k, v in host.items()}
    return host


@torch.no_grad()
def naive_encode(model, inputs: dict[str, torch.Tensor], batch_size: int) -> M3ELFeatures:
    """The authors' path: encode every batch and keep all four raw features on the host, in float32."""
    device, kept = model.device, {}
    count = inputs["input_ids"].shape[0]
    for start in range(0, count, batch_size):
        batch = {k: v[start : start + batch_size].to(device, non_blocking=True) for k, v in inputs.items()}
        for name, tensor in model.encode(**batch, side="entity").items():
            kept.setdefault(name, []).append(tensor.float().cpu())
    return M3ELFeatures(**{k: torch.cat(v) for k, v in kept.items()})


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, sizes="4096")
    parser.add_argument("--batch-size", type=int, default=None, help="entities per batch (default: 512 on GPU, the "
                        "authors' size; 256 on CPU)")
    parser.add_argument("--fast-dtype", default="bfloat16", help="the half-precision model's dtype ('none': skip)")
    args = parser.parse_args(argv)
    gpu = torch.device(args.device).type == "cuda"
    if args.check:
        args.sizes = "96"
        args.batch_size = 32
    args.sizes = parse_sizes(args.sizes)
    args.batch_size = args.batch_size or (512 if gpu else 256)
    return args


def run(args) -> dict:
    apply_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(args.model, args.mode, device, args.seed)
    _, fingerprint_seconds = timed(lambda: model_fingerprint(model), device)
    models = {"float32": model}
    if args.fast_dtype != "none":
        models[args.fast_dtype] = copy.deepcopy(model).to(DTYPES[args.fast_dtype])
    results = []
    for count in args.sizes:
        inputs = random_inputs(model.config, count, device, args.seed + count)
        ids = [f"E{i}" for i in range(count)]
        warm = {k: v[: min(count, args.batch_size)] for k, v in inputs.items()}
        naive_encode(model, warm, args.batch_size)
        naive, naive_seconds = best_of(lambda: naive_encode(model, inputs, args.batch_size), device, args.repeat)
        row = {
            "entities": count,
            "naive_entities_per_s": count / naive_seconds,
            "naive_host_bytes": sum(v.numel() * v.element_size() for v in naive.values()),
            "fingerprint_s": fingerprint_seconds,
        }
        for name, encoder in models.items():
            EntityIndex.from_inputs(encoder, warm, ids[: len(warm["input_ids"])], batch_size=args.batch_size)
            index, seconds = best_of(
                lambda encoder=encoder: EntityIndex.from_inputs(encoder, inputs, ids, batch_size=args.batch_size),
                device,
                args.repeat,
            )
            # (the model's fingerprint included: its weights are copied first, then hashed in a thread beside the
            # encoding)
            row[f"index_{name}_entities_per_s"] = count / seconds
            row[f"index_{name}_bytes"] = index.nbytes
            if name == "float32":  # the index holds exactly what prepare_entities makes of the naive features
                prepared = model.prepare_entities(M3ELFeatures(**{k: v[:64].to(device) for k, v in naive.items()}))
                row["index_matches_naive_features"] = all(
                    torch.allclose(index.tensors[f"{b}.{n}"][:64], t, rtol=1e-4, atol=1e-4)
                    for b, part in prepared.items() for n, t in part.items()
                )
            del index
        results.append(row)
        del naive, inputs
    return {"benchmark": "entity_encoding", "machine": machine(device), "args": vars(args), "results": results}


def table(payload: dict) -> str:
    names = [n for n in ("float32", payload["args"]["fast_dtype"]) if n != "none"]
    rows = []
    for r in payload["results"]:
        row = [f"{r['entities']:,}", f"{r['naive_entities_per_s']:,.0f}"]
        for name in names:
            rate = r[f"index_{name}_entities_per_s"]
            row.append(f"**{rate:,.0f}** ({rate / r['naive_entities_per_s']:.2f}x)")
        row += [gib(r["naive_host_bytes"])] + [gib(r[f"index_{name}_bytes"]) for name in names]
        row.append("yes" if r.get("index_matches_naive_features") else "NO")
        rows.append(row)
    header = ["entities", "authors' path entities/s (fp32, raw features to host)"]
    header += [f"EntityIndex.from_inputs entities/s, {name} model" for name in names]
    header += ["raw features kept (fp32)"] + [f"index ({name})" for name in names] + ["index = prepared naive features"]
    return markdown_table(header, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    print(f"# Entity encoding from preprocessed tensors: {args.model} model, {args.mode}, batch {args.batch_size}, "
          f"{payload['machine']}; the model's fingerprint alone (once per index; in the index's time, hashed "
          f"beside the encoding): {payload['results'][0]['fingerprint_s']:.2f} s")
    print(table(payload))
    write_json(args.json, payload)
    if not all(r.get("index_matches_naive_features") for r in payload["results"]):
        print("ERROR: the index does not hold what prepare_entities makes of the encoded features", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
