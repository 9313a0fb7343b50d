"""A KB's metadata (`entities.jsonl`) as the pipeline reads it: `EntityRecords` (the file scanned for each line's id
and offset, a record parsed when it is shown) against parsing every line into dicts (what the pipeline did before),
in the same run, with the time to open, the memory held, the time to show one mention's top 5, and whether the
records are the same. Also `load_entities(ids=...)` for 5 ids (what `m3el link` reads).

The file: synthetic entities as `m3el index` writes them (id, name, a description of 8 to 40 words, one absolute image
path), about 250 bytes a line. Time and memory come from separate runs (tracing allocations slows the parse several
times over); memory is what stays allocated (`tracemalloc`), not the process's peak.

    python benchmarks/bench_entity_metadata.py --sizes 100000,1000000 --repeat 3
"""

import argparse
import json
import os
import random
import sys
import tempfile
import tracemalloc

from common import best_of, machine, markdown_table, parse_sizes, write_json

from modeling_m3el.pipeline_m3el import EntityRecords, load_entities

WORDS = ("river", "bank", "city", "harbor", "football", "club", "album", "band", "painter", "village", "founded",
         "born", "station", "island", "company", "film", "series", "novel", "player", "minister")


def write_kb(path: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            description = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            record = {"id": f"Q{i}", "name": f"{rng.choice(WORDS).title()} {i}", "description": description,
                      "images": [f"/data/kb/images/{i % 1000:03d}/Q{i}.jpg"]}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def parse_all(path: str) -> dict:
    return {record["id"]: record for record in load_entities(path)}


def held_bytes(fn) -> int:
    """Bytes allocated by `fn` and still held by what it returns."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del result  # (an EntityRecords closes its file when dropped)
    return held


def show(records, ids) -> list:
    """What a pipeline's results read of the metadata (`describe`): each id's record once, its name, description and
    first image."""
    return [(record["name"], record["description"], record["images"][0]) for record in map(records.get, ids)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated KB sizes (entities)")
    parser.add_argument("--repeat", type=int, default=3, help="time every measurement this many times, keep the best")
    parser.add_argument("--mentions", type=int, default=200, help="mentions whose top 5 are shown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--check", action="store_true", help="smallest run, for tests")
    args = parser.parse_args(argv)
    if args.check:
        args.sizes, args.repeat, args.mentions = "2000", 1, 20
    rng = random.Random(args.seed)
    results, rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        for count in parse_sizes(args.sizes):
            path = os.path.join(folder, f"entities_{count}.jsonl")
            write_kb(path, count, args.seed)
            shown = [[f"Q{rng.randrange(count)}" for _ in range(5)] for _ in range(args.mentions)]
            parsed, parse_seconds = best_of(lambda path=path: parse_all(path), "cpu", args.repeat)
            lazy, scan_seconds = best_of(lambda path=path: EntityRecords(path), "cpu", args.repeat)
            _, show_parsed = best_of(lambda parsed=parsed: [show(parsed, ids) for ids in shown], "cpu", args.repeat)
            _, show_lazy = best_of(lambda lazy=lazy: [show(lazy, ids) for ids in shown], "cpu", args.repeat)
            _, five_ids = best_of(lambda path=path: load_entities(path, ids=shown[0]), "cpu", args.repeat)
            sample = list(parsed) if args.check else rng.sample(list(parsed), 10_000)
            same = list(lazy) == list(parsed) and all(lazy[i] == parsed[i] for i in sample)
            lazy.close()
            del parsed, lazy
            parse_bytes = held_bytes(lambda path=path: parse_all(path))
            scan_bytes = held_bytes(lambda path=path: EntityRecords(path))
            row = {"entities": count, "file_bytes": os.path.getsize(path), "parse_all_s": parse_seconds,
                   "scan_s": scan_seconds, "parse_all_held_bytes": parse_bytes, "scan_held_bytes": scan_bytes,
                   "show_top5_parsed_ms": 1e3 * show_parsed / args.mentions,
                   "show_top5_lazy_ms": 1e3 * show_lazy / args.mentions, "load_5_ids_s": five_ids,
                   "records_compared": len(sample), "same_records": same}
            results.append(row)
            rows.append([f"{count:,}", f"{row['file_bytes'] / 2**20:.0f} MiB", f"{parse_seconds:.2f} s",
                         f"{scan_seconds:.2f} s", f"{parse_seconds / scan_seconds:.1f}x",
                         f"{parse_bytes / 2**20:.0f} MiB", f"{scan_bytes / 2**20:.0f} MiB",
                         f"{parse_bytes / scan_bytes:.1f}x", f"{row['show_top5_parsed_ms']:.3f} ms",
                         f"{row['show_top5_lazy_ms']:.3f} ms", f"{five_ids:.2f} s", same])
            os.remove(path)
            print(f"{count} entities done", file=sys.stderr, flush=True)
    print(f"# A KB's metadata as the pipeline reads it; {machine('cpu')}")
    print(markdown_table(
        ["entities", "file", "open: parse every line", "open: EntityRecords", "ratio", "held: parsed dicts",
         "held: EntityRecords", "ratio", "one mention's top 5: dicts", "top 5: EntityRecords",
         "load_entities, 5 ids", "same records"], rows))
    write_json(args.json, {"benchmark": "entity_metadata", "machine": machine("cpu"), "args": vars(args),
                           "results": results})
    return 0 if all(row["same_records"] for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
