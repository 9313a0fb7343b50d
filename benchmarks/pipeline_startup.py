"""A pipeline built on a saved index folder (an `m3el index` output, with its `entities.jsonl`), then one mention
linked: the construction's time, the process's resident memory before and after it, the link's time, and the top
entities. Run it under two versions of the package to compare them (`PYTHONPATH` set to a `git worktree` of the
other):

    python benchmarks/pipeline_startup.py m3el-demo/model m3el-demo-1m/index
    git worktree add /tmp/old a96e73f && PYTHONPATH=/tmp/old python benchmarks/pipeline_startup.py m3el-demo/model \
        m3el-demo-1m/index

The mention is the first of `test.jsonl` in the index folder's parent (as `scaled_demo_kb.py` writes it), linked with
`top_k=5` and `candidates=100`.
"""

import argparse
import json
import os
import time


def resident_gib() -> float | None:
    """The process's resident memory (Linux's /proc), in GiB; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the model folder (its processor with it)")
    parser.add_argument("index", help="the index folder, with entities.jsonl beside the index files")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = parser.parse_args(argv)

    import torch

    import modeling_m3el
    from modeling_m3el import M3ELModel, M3ELProcessor
    from modeling_m3el.pipeline_m3el import M3ELEntityLinkingPipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    model = M3ELModel.from_pretrained(args.model).eval()
    processor = M3ELProcessor.from_pretrained(args.model)
    before = resident_gib()
    start = time.perf_counter()
    linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=args.index, device="cpu")
    construct_s = time.perf_counter() - start
    after = resident_gib()
    with open(os.path.join(args.index, os.pardir, "test.jsonl"), encoding="utf-8") as f:
        mention = json.loads(f.readline())
    start = time.perf_counter()
    results = linker({"mention": mention["mention"], "text": mention["sentence"], "image": mention["image"]},
                     top_k=5, candidates=100)
    link_s = time.perf_counter() - start
    print(json.dumps({
        "package": os.path.dirname(modeling_m3el.__file__), "entities": len(linker.index),
        "metadata_held_as": type(linker.entities).__name__, "construct_s": round(construct_s, 4),
        "resident_gib_before": before, "resident_gib_after_construction": after, "link_s": round(link_s, 4),
        "top": [(entity["id"], entity["name"]) for entity in results],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
