"""The `m3el` command: evaluate a saved model on a benchmark split, build an entity index, convert an authors'
checkpoint, link mentions, build the publishable folder of a training run and push it to the Hub."""

import argparse
import json
import os
import sys

DTYPES = ("float32", "bfloat16", "float16")


def _load_model(folder: str, dtype: str, device: str | None):
    import torch

    from . import M3ELModel, M3ELProcessor
    from .pipeline_m3el import _looks_local

    if not os.path.isdir(folder) and _looks_local(folder):
        raise SystemExit(f"error: no such model folder: {folder}")
    try:
        model = M3ELModel.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
        processor = M3ELProcessor.from_pretrained(folder)
    except OSError as error:  # no such folder or Hub repo, or one without the files of a saved M3EL
        raise SystemExit(f"error: cannot load an M3EL model and processor from {folder!r}: {error}") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), processor


COUNTS_FROM_ZERO = ("--num-workers", "--examples")  # the count arguments for which 0 means none


def _check_counts(args, flags=("--batch-size", "--entity-batch-size", "--num-workers", "--examples")) -> None:
    """The size and count arguments: positive (sizes) or at least 0 (`COUNTS_FROM_ZERO`), said before anything
    loads. Arguments a command does not have are skipped."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        if flag in COUNTS_FROM_ZERO and value < 0:
            raise SystemExit(f"error: {flag} must be 0 or a positive integer, got {value}")
        if flag not in COUNTS_FROM_ZERO and value <= 0:
            raise SystemExit(f"error: {flag} must be a positive integer, got {value}")


def _check_index_folder(folder: str | None) -> None:
    """`--index`: an existing folder, said before the model loads."""
    if folder is not None and not os.path.isdir(folder):
        raise SystemExit(f"error: --index: no such folder: {folder}")


def _load_index(folder: str, model, what: str = "--index", **kwargs):
    """`EntityIndex.load`, its errors about the folder's files (missing, damaged, of two different saves) as one line;
    a stale index (StaleIndexError) is left to `main`."""
    from .index_m3el import EntityIndex, StaleIndexError

    try:
        return EntityIndex.load(folder, model, **kwargs)
    except StaleIndexError:
        raise
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {what}: {error}") from None


def _eval(args) -> int:
    from .data import load_benchmark
    from .evaluation import gold_ranks, index_rows, ranking_metrics
    from .index_m3el import EntityIndex, check_candidates

    try:
        check_candidates(args.candidates)
    except ValueError as error:
        raise SystemExit(f"error: --{error}") from None
    _check_counts(args)
    _check_index_folder(args.index)
    benchmark = load_benchmark(args.data, splits=[args.split])  # first: a data error is said before the model loads
    print(benchmark.summary(), file=sys.stderr)
    model, processor = _load_model(args.model, args.dtype, args.device)
    if args.index:
        index = _load_index(args.index, model, device=model.device)
        if index.entity_ids != [str(i) for i in benchmark.entities["id"]]:  # (an index's ids are strings)
            raise SystemExit(f"error: the index in {args.index} does not hold the entities of {args.data}")
    else:
        index = EntityIndex.build(model, processor, index_rows(benchmark.entities), batch_size=args.entity_batch_size,
                                  num_workers=args.num_workers)
    ranks = gold_ranks(model, processor, index, benchmark.splits[args.split], batch_size=args.batch_size,
                       description=f"Ranking {args.split}", num_workers=args.num_workers, candidates=args.candidates)
    results = {"model": args.model, "data": args.data, "split": args.split, "entities": len(index)}
    if args.candidates is not None and args.candidates < len(index):
        # what the pipeline's candidates=K gives: a gold among the K ranks at most K, one outside them last
        results.update(candidates=args.candidates, gold_among_candidates=float((ranks < len(index)).mean()))
    results.update(ranking_metrics(ranks))
    print(json.dumps(results, indent=1))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


DIGESTS_FILE = "kb_digests.json"  # beside an index `m3el index` wrote: what each entity's content was


def _entity_digest(row: dict) -> str:
    """A digest of what an entity's encoding depends on: its name, description and image (the file's bytes)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for text in (row["name"], row["description"]):
        digest.update(text.encode() + b"\0")
    image = row.get("image")
    if isinstance(image, str) and os.path.isfile(image):
        with open(image, "rb") as f:
            digest.update(f.read())
    else:  # no image, or a missing file (encoded as the all-zero image)
        digest.update(b"no image" if image is None else f"missing {image}".encode())
    return digest.hexdigest()


def _index(args) -> int:
    from .data import load_benchmark
    from .evaluation import index_rows
    from .index_m3el import INDEX_META, EntityIndex, StaleIndexError
    from .pipeline_m3el import save_entities

    _check_counts(args)
    benchmark = load_benchmark(args.data, splits=[])
    model, processor = _load_model(args.model, args.dtype, args.device)
    rows = index_rows(benchmark.entities)
    digests = {str(row["id"]): _entity_digest(row) for row in rows}
    digests_path = os.path.join(args.output, DIGESTS_FILE)
    previous, indexed, reused = None, set(), []
    if args.update and os.path.isfile(os.path.join(args.output, INDEX_META)):
        try:
            # on the CPU, where the index is assembled and saved
            previous = EntityIndex.load(args.output, model, device="cpu")
        except StaleIndexError as error:
            raise SystemExit(f"error: --update: {error}") from None
        except (OSError, ValueError) as error:  # files missing, damaged or of two different saves
            raise SystemExit(f"error: --update: {error}; index without --update") from None
        try:
            with open(digests_path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"error: --update: {digests_path} cannot be read ({error}), so which entities changed "
                             "is unknown; index without --update") from None
        # the same model, and the same encoding of the entities: the index's content id (kept when the index is saved
        # again); digests written before it was kept name the index's save id (None for both before that was kept),
        # which an index saved then has as content id
        link = saved.get("content_id", saved.get("save_id")) if isinstance(saved, dict) else None
        if not isinstance(saved, dict) or saved.get("fingerprint") != previous.fingerprint or link not in (
            previous.content_id, previous.save_id
        ):
            raise SystemExit(f"error: --update: {digests_path} does not belong to the index beside it (an "
                             "interrupted run?); index without --update")
        indexed = set(previous.entity_ids)
        reused = [i for i, digest in digests.items() if i in indexed and saved["entities"].get(i) == digest]
    reused_ids = set(reused)
    fresh = [row for row in rows if str(row["id"]) not in reused_ids]
    encoded = None
    if fresh:
        encoded = EntityIndex.build(model, processor, fresh, batch_size=args.entity_batch_size, device="cpu",
                                    dtype=previous.dtype if reused else None, num_workers=args.num_workers)
    index = _updated_index(previous, reused, encoded, list(digests)) if reused else encoded
    index.save(args.output)
    # the names, descriptions and image paths that `m3el link --index` and the pipeline show with the results
    save_entities(args.output, [{**row, "image": os.path.abspath(row["image"]) if row.get("image") else None}
                                for row in rows])
    # after the index: a crash between the two leaves digests of the previous save, which the next --update refuses
    # (it names the remedy: index without --update)
    _write_json_atomically(digests_path, {"fingerprint": index.fingerprint, "content_id": index.content_id,
                                          "save_id": index.save_id, "entities": digests})
    summary = ""
    if args.update and previous is None:
        summary = " (no index there yet: every entity encoded)"
    elif args.update:
        new, dropped = len(digests.keys() - indexed), len(indexed - digests.keys())
        summary = (f" ({len(reused)} entities reused; {len(fresh)} encoded: {new} new, {len(fresh) - new} changed; "
                   f"{dropped} dropped)")
    print(f"{index} saved in {args.output}{summary}")
    return 0


def _updated_index(previous, reused: list[str], encoded, order: list[str]):
    """
    The index of `order`'s entities: the `reused` ones' rows from `previous`, the others' from `encoded` (None: none).
    Each tensor is allocated once and filled in slices, so the update holds the previous index (memory-mapped) and the
    new one, not the copies a select, a concatenation and a reorder would make (about 4.7 times the index at 1M
    entities). Nothing encoded and the same entities in the same order: a copy of `previous`, its content id kept.
    """
    import torch

    from .index_m3el import EntityIndex

    if encoded is None and reused == previous.entity_ids == order:
        return previous.select(order)
    if encoded is not None and encoded.fingerprint != previous.fingerprint:  # (the model is the same by construction)
        raise ValueError("the entities encoded anew do not come from the index's model")
    row_of = {entity_id: row for row, entity_id in enumerate(order)}
    sources = [(previous, reused)] + ([(encoded, encoded.entity_ids)] if encoded is not None else [])
    tensors = {}
    for name, tensor in previous.tensors.items():
        output = torch.empty((len(order), *tensor.shape[1:]), dtype=tensor.dtype)
        for index, ids in sources:
            for start in range(0, len(ids), 65536):
                part = ids[start : start + 65536]
                output[torch.tensor([row_of[i] for i in part])] = index.tensors[name][index.positions(part)]
        tensors[name] = output
    float16 = {index.float16_fingerprint for index, _ in sources}
    return EntityIndex(tensors, order, previous.fingerprint, float16.pop() if len(float16) == 1 else None)


def _write_json_atomically(path: str, payload: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(temporary, path)


def _convert(args) -> int:
    from .convert_official_checkpoint import main as convert_main

    return convert_main(args.convert_args)


def _link(args) -> int:
    from .index_m3el import INDEX_META, check_candidates
    from .pipeline_m3el import ENTITIES_FILE, M3ELEntityLinkingPipeline, check_top_k

    # the arguments first: a mistake is said before the model loads
    for flag, value in (("--mention", args.mention), ("--sentence", args.sentence)):
        if not value.strip():
            raise SystemExit(f"error: {flag} is empty")
    try:
        check_top_k(args.top_k)
        check_candidates(args.candidates)
    except ValueError as error:
        raise SystemExit(f"error: --{error}".replace("--top_k", "--top-k")) from None
    _check_index_folder(args.index)
    if args.entities is not None and not os.path.isfile(args.entities):
        raise SystemExit(f"error: --entities {args.entities}: no such file")
    if args.index is None and os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, INDEX_META)):
        raise SystemExit(f"error: {args.model} holds no entity index: give --index (a folder built by m3el index), or "
                         "link with a folder built by m3el export, which carries its KB's index")
    model, processor = _load_model(args.model, args.dtype, args.device)
    index = _load_index(args.index, model) if args.index else None
    # by default the metadata beside the index: in --index, or in a local model folder that carries its index
    beside = os.path.join(args.index or args.model, ENTITIES_FILE)
    entities = args.entities or (beside if os.path.isfile(beside) else None)
    try:
        # the metadata of the results only, read after ranking: not every line of a large KB's file
        linker = M3ELEntityLinkingPipeline(model=model, processor=processor, index=index,
                                           entities=[] if entities else None, device=model.device)
        results = linker({"mention": args.mention, "text": args.sentence, "image": args.image}, top_k=args.top_k,
                         candidates=args.candidates, unreadable_image=args.unreadable_image)
        if entities:
            linker.set_entities(entities, ids=[entity["id"] for entity in results])
            results = [{**entity, **linker.describe(entity["id"])} for entity in results]
            unknown = [entity["id"] for entity in results if entity["id"] not in linker.entities]
            if unknown:
                print(f"warning: {len(unknown)} of the {len(results)} entities found have no metadata in {entities} "
                      f"(e.g. {unknown[:3]}): their names are empty", file=sys.stderr)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        for entity in results:
            # probabilities over a large KB can be small: three significant digits rather than three decimals
            print(f"{entity['rank']:>3}  {entity['score']:9.4f}  {entity['probability']:9.3g}  {entity['id']}  "
                  f"{entity['name'] or ''}  {entity['description'] or ''}")
    return 0


def _export_arguments(sub):
    sub.add_argument("--data", default=None,
                     help="the benchmark whose KB is indexed (default: the run's dataset_dir, or its demo_dir)")
    sub.add_argument("--dataset-id", default=None, help="the benchmark's Hub dataset id, if any (card metadata)")
    sub.add_argument("--entity-images", choices=("thumbnail", "none"), default="thumbnail",
                     help="thumbnail: small copies of the entity images in the folder (shown by the pipeline's "
                          "results and the Space); none: no images")
    sub.add_argument("--examples", type=int, default=3, help="example test mentions shipped with the model")
    sub.add_argument("--device", default=None, help="device that encodes the KB (default: cpu)")
    sub.add_argument("--num-workers", type=int, default=4, help="threads reading the KB's images ahead of the model")


def _export(args) -> int:
    from .publish import build_hub_folder

    _check_counts(args)
    folder = build_hub_folder(
        args.run, args.output, data_dir=args.data, repo_id=args.repo_id, dataset_id=args.dataset_id,
        entity_images=args.entity_images, num_examples=args.examples, device=args.device, overwrite=args.overwrite,
        num_workers=args.num_workers,
    )
    print(f"Publishable folder in {folder}")
    return 0


def _push(args) -> int:
    import tempfile

    from .publish import REQUIRED_FILES, build_hub_folder, push_to_hub

    _check_counts(args)
    source = os.path.abspath(args.source)
    with tempfile.TemporaryDirectory(prefix="m3el-push-") as scratch:
        folder = source
        if not all(os.path.isfile(os.path.join(source, name)) for name in REQUIRED_FILES):
            # A training run (or its model/ folder): build the folder first, for this repo.
            folder = build_hub_folder(
                source, args.build_dir or os.path.join(scratch, "folder"), data_dir=args.data, repo_id=args.repo_id,
                dataset_id=args.dataset_id, entity_images=args.entity_images, num_examples=args.examples,
                device=args.device, overwrite=args.build_dir is not None, num_workers=args.num_workers,
            )
        if not args.dry_run and args.token is None:
            from huggingface_hub import get_token

            if get_token() is None:
                raise SystemExit("error: no Hub token: log in with `hf auth login`, set HF_TOKEN, or pass --token")
        try:
            result = push_to_hub(folder, args.repo_id, private=args.private, commit_message=args.commit_message,
                                 token=args.token, dry_run=args.dry_run)
        except (ValueError, FileNotFoundError) as error:  # not a folder to publish, or not for this repo
            raise SystemExit(f"error: {error}") from None
        except Exception as error:  # the network or the Hub refused: one line (the folder is left as it is)
            if args.dry_run:
                raise
            why = (str(error).strip().splitlines() or [""])[0][:300]
            raise SystemExit(f"error: pushing to {args.repo_id} failed: {type(error).__name__}: {why}") from None
        if args.dry_run:
            visibility = "private" if args.private else "public"
            print(f"Would create {visibility} model repo {args.repo_id} (if absent) and upload {len(result)} files "
                  f"from {folder}:")
            print("\n".join(f"  {name}" for name in result))
        else:
            print(f"Pushed {folder} to {result.commit_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m3el", description="M3EL multimodal entity linking.")
    commands = parser.add_subparsers(dest="command", required=True)

    def model_arguments(sub):
        sub.add_argument("--model", required=True, help="a saved M3EL folder (save_pretrained, or a training run's model/)")
        sub.add_argument("--data", required=True, help="a benchmark folder (release layout or JSON Lines)")
        sub.add_argument("--dtype", choices=DTYPES, default="float32",
                         help="float32: exact ranking; float16/bfloat16: faster, approximate (float16 the closer: "
                         "3 more significant bits)")
        sub.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
        sub.add_argument("--entity-batch-size", type=int, default=256)
        sub.add_argument("--num-workers", type=int, default=4, help="threads reading and resizing images ahead of "
                         "the model (0: in the main thread)")

    evaluate = commands.add_parser("eval", help="rank a split's gold entities against the whole KB: MR, MRR, Hits@k")
    model_arguments(evaluate)
    evaluate.add_argument("--split", default="test", help="train, dev or test (default: test)")
    evaluate.add_argument("--index", default=None, help="a saved entity index of this model and KB (else built)")
    evaluate.add_argument("--batch-size", type=int, default=64, help="mentions per batch")
    evaluate.add_argument("--candidates", type=int, default=None,
                          help="rank among each mention's K candidates, as the pipeline's candidates=K links (a gold "
                               "outside them counts as last), to choose K; default: among the whole KB")
    evaluate.add_argument("--output", default=None, help="also write the results to this JSON file")
    evaluate.set_defaults(handler=_eval)

    index = commands.add_parser("index", help="encode a benchmark's KB into an entity index folder")
    model_arguments(index)
    index.add_argument("--output", required=True, help="folder for entity_index.safetensors and entity_index.json")
    index.add_argument("--update", action="store_true", help="reuse the index already in --output (same model): "
                       "encode only the entities that are new or whose name, description or image changed, drop "
                       "those no longer in the KB")
    index.set_defaults(handler=_index)

    convert = commands.add_parser(
        "convert", help="convert an authors' checkpoint (all arguments go to modeling_m3el.convert_official_checkpoint)",
        add_help=False,
    )
    convert.add_argument("convert_args", nargs=argparse.REMAINDER)
    convert.set_defaults(handler=_convert)

    link = commands.add_parser(
        "link", help="link one mention (its name, sentence and image) to the top-k entities of a model's KB",
        description="Link a mention with the multimodal-entity-linking pipeline. The KB is the entity index saved in "
                    "the model folder (m3el export puts one there), or the one given with --index.",
    )
    link.add_argument("--model", required=True, help="a saved M3EL folder (built by m3el export, or any with --index)")
    link.add_argument("--mention", required=True, help="the mention, as it appears in the sentence")
    link.add_argument("--sentence", "--text", dest="sentence", required=True, help="the sentence it occurs in")
    link.add_argument("--image", default=None, help="the image posted with it: a path or an http(s) URL (optional)")
    link.add_argument("--top-k", type=int, default=5, help="entities to return (default: 5)")
    link.add_argument("--candidates", type=int, default=None,
                      help="score exactly only the K entities of best estimated score (a large KB; approximate); "
                           "default: every entity")
    link.add_argument("--index", default=None, help="a folder saved with EntityIndex.save (m3el index); default: "
                                                    "the model folder's own index")
    link.add_argument("--entities", default=None, help="the KB's entities.jsonl (names, descriptions, images); "
                                                       "default: the one next to the index")
    link.add_argument("--unreadable-image", choices=("error", "zero"), default="error",
                      help="an image that cannot be read: fail (default), or score with an all-zero image")
    link.add_argument("--dtype", choices=DTYPES, default="float32",
                      help="float32: exact; float16/bfloat16: faster (float16 the closer)")
    link.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda when available)")
    link.add_argument("--json", action="store_true", help="print the results as JSON")
    link.set_defaults(handler=_link)

    export = commands.add_parser(
        "export", help="build the publishable folder of a training run (model, code, pipeline, entity index, card)",
        description="Build the folder a training run is published as: config, weights, processor, Hub code with the "
                    "multimodal-entity-linking pipeline, the entity index of its KB with the entities' metadata and "
                    "thumbnails, example mentions, the Endpoints handler and the model card with plots.",
    )
    export.add_argument("--run", required=True, help="train_accelerate.py's output folder (or its model/ folder)")
    export.add_argument("--output", required=True, help="the folder to build (new or empty, unless --overwrite)")
    export.add_argument("--repo-id", default=None, help="the Hub repo it is meant for (the card's snippets load it)")
    export.add_argument("--overwrite", action="store_true", help="replace --output if it is not empty")
    _export_arguments(export)
    export.set_defaults(handler=_export)

    push = commands.add_parser(
        "push", help="push a built folder (or a training run, built first) to a Hub model repo",
        description="Create the model repo (private or public; an existing repo keeps its visibility) and upload the "
                    "folder in one commit. Give a folder built by m3el export, or a training run's output folder, "
                    "which is built first (into --build-dir, or a temporary folder). Needs a Hub token (hf auth login, "
                    "HF_TOKEN or --token), except with --dry-run.",
    )
    push.add_argument("source", help="a folder built by m3el export, or a training run's output folder")
    push.add_argument("--repo-id", required=True, help="user-or-org/name of the model repo")
    push.add_argument("--private", action="store_true", help="create the repo private (default: public)")
    push.add_argument("--commit-message", default=None, help="the commit's message")
    push.add_argument("--dry-run", action="store_true",
                      help="build if needed, then list the files that would be uploaded; touch nothing on the Hub")
    push.add_argument("--token", default=None, help="a Hub token (default: the logged-in one, or HF_TOKEN)")
    push.add_argument("--build-dir", default=None, help="where to build a training run's folder (kept), instead of a "
                                                        "temporary folder")
    _export_arguments(push)
    push.set_defaults(handler=_push)
    return parser


def _input_errors() -> tuple[type[Exception], ...]:
    """Errors that say what is wrong with the user's files (a data file and its record, a stale index): reported as
    one line, without a traceback. (Imported only when an error is being handled: `--help` stays fast.)"""
    from .data import MELDataError
    from .index_m3el import StaleIndexError

    return MELDataError, StaleIndexError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert"]:  # every argument is the converter's (argparse's REMAINDER would stop at an option)
        from .convert_official_checkpoint import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except _input_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
