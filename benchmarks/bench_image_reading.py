"""`EntityIndex.build` from image files: entities/s with the images read and resized in the calling thread (as
before) against reading threads ahead of the model (`num_workers`, `M3ELProcessor.prefetched`), in the same run,
and whether the indexes are identical (on a GPU: within 1e-4).

The KB: photograph-like JPEG images (smooth colour fields with grain, 500 x 375, as news and product photos are
mostly larger than CLIP's 224 px) written to a temporary folder, and short texts. `--model tiny224`: a 2-layer CLIP
of the tests' widths taking 224 px images in 32 px patches, so that the model's share is small and the images'
share shows on a CPU; `--model b32`: ViT-B/32 (on a GPU, where the model is fast and reading the images is what is
left).

    python benchmarks/bench_image_reading.py --sizes 512 --workers 1,2,4 --threads 1     # CPU
    python benchmarks/bench_image_reading.py --model b32 --device cuda --sizes 8192      # GPU
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from common import add_common_arguments, apply_threads, best_of, machine, markdown_table, parse_sizes, write_json

from modeling_m3el import M3ELConfig, M3ELModel, M3ELProcessor
from modeling_m3el.index_m3el import EntityIndex
from modeling_m3el.tiny import tiny_clip_config, tiny_image_processor, tiny_tokenizer

WORDS = ("river", "bank", "city", "harbor", "red", "green")


def write_images(folder: str, count: int, size: tuple[int, int], seed: int) -> list[str]:
    """`count` JPEG files: a smooth colour field with grain (compresses like a photograph, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    width, height = size
    x, y = np.linspace(0, 1, width)[None, :, None], np.linspace(0, 1, height)[:, None, None]
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        field = 0.5 + 0.35 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + phase)
        pixels = np.clip(field + 0.08 * rng.standard_normal((height, width, 3)), 0, 1)
        path = os.path.join(folder, f"entity_{i}.jpg")
        Image.fromarray((255 * pixels).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def build(size: str, mode: str, device) -> tuple[M3ELModel, M3ELProcessor]:
    """A model with random weights and its processor (224 px images, or 32 px for `--check`'s tiny)."""
    tokenizer = tiny_tokenizer(WORDS)
    image_size = 32 if size == "tiny" else 224
    processor = M3ELProcessor(tiny_image_processor(image_size), tokenizer)
    torch.manual_seed(0)
    if size == "b32":
        config = M3ELConfig(cross_modal=mode)  # ViT-B/32 (the tiny tokenizer's ids are valid token ids of its vocabulary)
    else:
        clip = tiny_clip_config(tokenizer, image_size=image_size, patch_size=8 if size == "tiny" else 32)
        config = M3ELConfig(clip_config=clip, matching_dim=16, text_max_length=processor.text_max_length,
                            cross_modal=mode)
    return M3ELModel(config).eval().to(device), processor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, sizes="512", model="tiny224", models={
        "tiny224": "the tests' CLIP widths taking 224 px images in 32 px patches (a small share for the model)"})
    parser.add_argument("--workers", default="1,2,4", help="comma-separated reading threads to time against 0")
    parser.add_argument("--batch-size", type=int, default=64, help="entities per batch (EntityIndex.build)")
    parser.add_argument("--image-size", default="500x375", help="the JPEG files' width x height")
    args = parser.parse_args(argv)
    if args.check:
        args.model, args.sizes, args.workers, args.batch_size, args.image_size = "tiny", "24", "2", 8, "60x40"
    apply_threads(args.threads)
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    image_size = tuple(int(v) for v in args.image_size.lower().split("x"))
    model, processor = build(args.model, args.mode, device)
    print(f"# EntityIndex.build from {image_size[0]}x{image_size[1]} JPEG files: {args.model} model, batch "
          f"{args.batch_size}; {machine(device)}")
    rows, results = [], []
    for count in parse_sizes(args.sizes):
        with tempfile.TemporaryDirectory(prefix="m3el-images-") as folder:
            paths = write_images(folder, count, image_size, args.seed)
            rng = np.random.default_rng(args.seed)
            kb = [{"id": f"E{i}", "name": " ".join(rng.choice(WORDS, 2)), "description": " ".join(rng.choice(WORDS, 8)),
                   "image": path} for i, path in enumerate(paths)]

            def run(num_workers: int) -> EntityIndex:
                return EntityIndex.build(model, processor, kb, batch_size=args.batch_size, progress=False,
                                         num_workers=num_workers)

            run(0)  # warm-up (and the files into the page cache, for every run alike)
            reference, seconds = best_of(lambda: run(0), device, args.repeat)
            row = {"entities": count, "workers": 0, "entities_per_s": count / seconds, "speedup": 1.0,
                   "identical": True, "agrees": True}
            results.append(row)
            rows.append([f"{count:,}", "0 (the calling thread)", f"{row['entities_per_s']:,.0f}", "1.00x", "-"])
            for num_workers in workers:
                index, threaded = best_of(lambda: run(num_workers), device, args.repeat)
                identical = all(torch.equal(index.tensors[k], t) for k, t in reference.tensors.items())
                # (on a GPU the same batches may still round differently from run to run: close is enough there)
                close = all(torch.allclose(index.tensors[k].float(), t.float(), rtol=1e-4, atol=1e-5)
                            for k, t in reference.tensors.items())
                row = {"entities": count, "workers": num_workers, "entities_per_s": count / threaded,
                       "speedup": seconds / threaded, "identical": identical,
                       "agrees": identical or (close and device.type != "cpu")}
                results.append(row)
                rows.append([f"{count:,}", str(num_workers), f"{row['entities_per_s']:,.0f}",
                             f"**{row['speedup']:.2f}x**",
                             "yes" if identical else "within 1e-4" if row["agrees"] else "NO"])
    print(markdown_table(["entities", "reading threads", "entities/s", "speed-up", "index identical"], rows))
    write_json(args.json, {"benchmark": "image_reading", "machine": machine(device), "args": vars(args),
                           "results": results})
    if not all(r["agrees"] for r in results):
        print("ERROR: the index built with reading threads differs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
