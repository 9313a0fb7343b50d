"""A large KB around the demo's, to measure a trained model at scale on a machine that cannot download a benchmark:
the demo KB's entities, then synthetic ones up to `--entities`, with the demo's test mentions (whose gold entities are
all in the KB), as a JSON Lines benchmark folder (`entities.jsonl`, `test.jsonl`).

    accelerate launch train_accelerate.py           # the demo data (m3el-demo-data) and model (m3el-demo/model)
    python benchmarks/scaled_demo_kb.py --data m3el-demo-data --entities 100000 --output m3el-demo-100k
    m3el index --model m3el-demo/model --data m3el-demo-100k --output m3el-demo-100k/index --device cpu

A synthetic entity has a name of the demo KB, one of its images, and a description of 6 to 10 words: drawn from the
demo KB's descriptions (`--words demo`; many entities then look alike to the model), or random letter strings
(`--words random`, which the demo tokenizer splits into pieces it rarely saw).
"""

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when the package is not installed

from modeling_m3el.data import load_benchmark  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the demo benchmark folder (or any benchmark folder)")
    parser.add_argument("--entities", type=int, required=True, help="entities of the KB written, the data's included")
    parser.add_argument("--words", choices=("demo", "random"), default="random")
    parser.add_argument("--split", default="test", help="the split whose mentions are written as test.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)

    benchmark = load_benchmark(args.data, splits=[args.split])
    kb = benchmark.entities
    if args.entities < len(kb):
        raise SystemExit(f"error: --entities {args.entities} is fewer than the {len(kb)} entities of {args.data}")
    names = sorted({name for name in kb["name"] if name})
    words = sorted({word for description in kb["description"] if description for word in description.split()})
    images = sorted({image for images in kb["images"] for image in images or [] if os.path.isfile(image)})
    if not images:
        raise SystemExit(f"error: {args.data}: no entity image found to reuse")
    rng = random.Random(args.seed)

    def word() -> str:
        if args.words == "demo":
            return rng.choice(words)
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9)))

    os.makedirs(args.output, exist_ok=True)
    entity_path = os.path.join(args.output, "entities.jsonl")
    with open(f"{entity_path}.tmp", "w", encoding="utf-8") as f:
        for row in kb:
            f.write(json.dumps({"id": str(row["id"]), "name": row["name"], "description": row["description"],
                                "images": [os.path.abspath(image) for image in row["images"] or []]}) + "\n")
        for number in range(args.entities - len(kb)):
            description = " ".join(word() for _ in range(rng.randint(6, 10)))
            f.write(json.dumps({"id": f"synthetic-{number}", "name": rng.choice(names), "description": description,
                                "images": [os.path.abspath(rng.choice(images))]}) + "\n")
    os.replace(f"{entity_path}.tmp", entity_path)
    mention_path = os.path.join(args.output, "test.jsonl")
    with open(f"{mention_path}.tmp", "w", encoding="utf-8") as f:
        for row in benchmark.splits[args.split]:
            f.write(json.dumps({"mention": row["mention"], "sentence": row["sentence"],
                                "image": os.path.abspath(row["image"]) if row["image"] else None,
                                "answer": row["answer"]}) + "\n")
    os.replace(f"{mention_path}.tmp", mention_path)
    print(f"{args.output}: {args.entities} entities ({len(kb)} of {args.data}), "
          f"{len(benchmark.splits[args.split])} test mentions")


if __name__ == "__main__":
    main()
