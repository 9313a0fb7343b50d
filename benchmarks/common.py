"""What the benchmark scripts share: model sizes, random features, timing, the machine's description, tables."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, when the package is not installed

from modeling_m3el import M3ELConfig, M3ELFeatures, M3ELModel  # noqa: E402
from modeling_m3el.tiny import tiny_config, tiny_processor  # noqa: E402

MODEL_SIZES = ("tiny", "b32")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_common_arguments(parser, sizes: str, models: dict[str, str] | None = None, model: str = "tiny"):
    """`--model` (`models`: extra sizes a script builds itself, name -> help; `model`: the default), `--device`,
    `--sizes`, `--mode`, `--seed`, `--json`, `--repeat`, `--check`."""
    models = models or {}
    parser.add_argument(
        "--model", choices=MODEL_SIZES + tuple(models), default=model,
        help="tiny: the 2-layer CLIP of the tests (hidden 32, d 16, 17 image tokens); b32: CLIP ViT-B/32's config "
        "(transformers.CLIPConfig() defaults: text 512, vision 768, projection 512, 50 image tokens), L 40, d 96"
        + "".join(f"; {name}: {text}" for name, text in models.items()),
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=sizes, help="comma-separated KB sizes (entities)")
    parser.add_argument("--mode", choices=("text_to_image", "bidirectional"), default="text_to_image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--repeat", type=int, default=1, help="time every measurement this many times, keep the best")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (and faiss); 1 is the robust "
                        "choice on a CPU shared with other jobs, where spinning OpenMP threads collapse throughput")
    parser.add_argument("--check", action="store_true", help="smallest run: a few entities and mentions, for tests")
    return parser


def add_noise_argument(parser, negative: str = ""):
    """`--noise`: a mention is its gold entity's features plus noise times N(0, 1) (`default_noise` when not given)."""
    parser.add_argument("--noise", type=float, default=None, help="mention = an entity's features + noise * N(0, 1) "
                        "(default: 1 for tiny, 5 for b32: gold ranks mostly small, not all 1, and a share of the "
                        "pairs the pruned ranker must score)" + negative)
    return parser


def default_noise(model_size: str, noise: float | None) -> float:
    """The mentions' noise: as given, else 1 for the tiny model and 5 for B/32 widths (whose features are wider, so
    that a noise of 1 leaves nearly every gold at rank 1 and nothing for the pruned ranker to score)."""
    return noise if noise is not None else (1.0 if model_size == "tiny" else 5.0)


def add_launch_argument(parser):
    parser.add_argument("--launch", help="a JSON file of fused-kernel launches per index dtype, as `check_kernel.py "
                        "--launch-out` writes the fastest ones that agree (default: kernels_m3el.LAUNCH)")
    return parser


def apply_launch(path: str | None) -> None:
    """Launch the fused G2L kernel as the JSON file says (see `add_launch_argument`), and say so."""
    if path is None:
        return
    from modeling_m3el import kernels_m3el

    with open(path) as handle:
        launches = json.load(handle)
    for dtype, launch in launches.items():
        if dtype not in kernels_m3el.LAUNCH:
            raise SystemExit(f"{path}: unknown index dtype {dtype!r} (expected one of {list(kernels_m3el.LAUNCH)})")
        kernels_m3el.LAUNCH[dtype] = dict(launch)
    print(f"# fused-kernel launch from {path}: {json.dumps(kernels_m3el.LAUNCH)}")


def apply_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads <= 0:
        raise SystemExit(f"--threads must be positive, got {threads}")
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def parse_sizes(text: str) -> list[int]:
    sizes = [int(float(s)) for s in text.split(",") if s.strip()]
    if not sizes or min(sizes) <= 0:
        raise SystemExit(f"--sizes must list positive KB sizes, got {text!r}")
    return sizes


def build_model(size: str, mode: str, device, seed: int = 0) -> M3ELModel:
    """A model with random weights (speed does not depend on their values), built from its config alone."""
    torch.manual_seed(seed)
    if size == "tiny":
        config = tiny_config(tiny_processor(), cross_modal=mode)
    else:
        config = M3ELConfig(cross_modal=mode)  # clip_config defaults to CLIPConfig(): ViT-B/32 sizes
    return M3ELModel(config).eval().to(device)


def feature_shapes(config: M3ELConfig) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of `M3ELModel.encode`'s outputs."""
    clip = config.clip_config
    tokens = (clip.vision_config.image_size // clip.vision_config.patch_size) ** 2 + 1
    return {
        "text_embeds": (clip.projection_dim,),
        "text_tokens": (config.text_max_length, clip.text_config.hidden_size),
        "image_embeds": (config.matching_dim,),
        "image_tokens": (tokens, config.matching_dim),
    }


def random_features(config: M3ELConfig, count: int, device, generator: torch.Generator) -> M3ELFeatures:
    """Random float32 features of `count` samples, made on `device` (its generator's device)."""
    return M3ELFeatures(
        **{
            name: torch.randn((count, *shape), generator=generator, device=device)
            for name, shape in feature_shapes(config).items()
        }
    )


def generator_for(device, seed: int) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_kb_with_mentions(model, num_entities: int, num_mentions: int, device, seed: int, noise: float):
    """Random entity features, an `EntityIndex` of them, and mentions that are noisy copies of random gold entities
    (features + `noise` * N(0, 1)): (index, mention features, gold entity ids)."""
    from modeling_m3el.index_m3el import EntityIndex

    generator = generator_for(device, seed + num_entities)
    entities = random_features(model.config, num_entities, device, generator)
    gold = torch.randint(0, num_entities, (num_mentions,), generator=generator, device=device)
    offsets = random_features(model.config, num_mentions, device, generator)
    mentions = M3ELFeatures(**{k: entities[k][gold] + noise * offsets[k] for k in entities.keys()})
    ids = [f"E{i}" for i in range(num_entities)]
    return EntityIndex.from_features(model, entities, ids), mentions, [ids[g] for g in gold.tolist()]


def trained_model_on_split(model_folder: str, data: str, split: str) -> tuple:
    """A trained model and its benchmark, as the `demo_*` scripts measure them: `(model, benchmark, index, mentions,
    features)`, with the benchmark's KB indexed (float32, on the CPU) and the split's mentions encoded."""
    from modeling_m3el import M3ELProcessor
    from modeling_m3el.data import load_benchmark
    from modeling_m3el.evaluation import index_rows
    from modeling_m3el.index_m3el import EntityIndex

    model = M3ELModel.from_pretrained(model_folder).eval()
    processor = M3ELProcessor.from_pretrained(model_folder)
    benchmark = load_benchmark(data, splits=[split])
    index = EntityIndex.build(model, processor, index_rows(benchmark.entities), progress=False)
    mentions = benchmark.splits[split]
    with torch.no_grad():
        inputs = processor.process_mentions(mentions["mention"], mentions["sentence"], mentions["image"])
        features = model.encode(**inputs)
    return model, benchmark, index, mentions, features


def timed(fn, device):
    """(result, seconds) of `fn()`, with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def best_of(fn, device, repeat: int):
    """(result, seconds) of the fastest of `repeat` runs of `fn`: on a shared machine the least disturbed run."""
    best = None
    for _ in range(max(1, repeat)):
        result, seconds = timed(fn, device)
        best = seconds if best is None else min(best, seconds)
    return result, best


def cpu_allocation_peak(fn) -> int | None:
    """Run `fn` once under the profiler and return the peak, in bytes, of the CPU memory it allocated and had not yet
    freed (the memory held before it is not counted): the running sum of the allocation events (frees are negative)
    in time order. None where this torch's profiler gives no allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        from torch._C._profiler import _EventType

        roots = prof.profiler.kineto_results.experimental_event_tree()
    except (AttributeError, ImportError):
        return None
    events, stack = [], list(roots)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    held = peak = 0
    for _, size in sorted(events, key=lambda event: event[0]):
        held += size
        peak = max(peak, held)
    return peak if events else None


def machine(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        processor = platform.processor() or platform.machine()
        where = f"{os.cpu_count()}-core CPU ({processor}), {torch.get_num_threads()} threads"
    load = f"; load average {os.getloadavg()[0]:.2f} at the start" if hasattr(os, "getloadavg") else ""
    return f"{where}; torch {torch.__version__}{load}"


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.3f} GiB" if num_bytes >= 2**27 else f"{num_bytes / 2**20:.1f} MiB"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=str)
