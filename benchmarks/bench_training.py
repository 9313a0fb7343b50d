"""Training throughput: M3EL's full training step (both CLIP passes, the matching network, the training loss,
backward, AdamW) on random inputs, in float32 and under bf16 autocast, with optional speed-ups (fused AdamW,
torch.compile, TF32) and activation checkpointing: mentions/s and peak memory (on a GPU, the allocator's peak over the
timed steps; on the CPU, the peak of one step's allocations above what was held before it, from the profiler's
allocation events: activations, gradients and temporaries).

    python benchmarks/bench_training.py --model b32 --batch 128 --steps 200      # on a GPU: the issue's check
    python benchmarks/bench_training.py --check                                   # tiny, CPU, a few steps

The authors' step (PERF_NOTES.md, H200, B/32, batch 128): 281 ms fp32 (455 mentions/s, 18.6 GiB peak),
150 ms in bf16 autocast (853 mentions/s, 12.6 GiB).
"""

import argparse
import contextlib

import torch

from common import (
    DTYPES,
    add_common_arguments,
    apply_threads,
    build_model,
    cpu_allocation_peak,
    gib,
    machine,
    markdown_table,
    synchronize,
    timed,
    write_json,
)


def random_batch(model, batch: int, device, generator: torch.Generator) -> dict:
    config = model.config
    vision = config.clip_config.vision_config
    vocab = config.clip_config.text_config.vocab_size
    length = config.text_max_length
    inputs = {}
    for prefix in ("", "entity_"):
        ids = torch.randint(0, vocab - 2, (batch, length), generator=generator, device=device)
        ids[:, -1] = config.clip_config.text_config.eos_token_id  # CLIP pools at the end-of-text token
        inputs[f"{prefix}input_ids"] = ids
        inputs[f"{prefix}attention_mask"] = torch.ones_like(ids)
        inputs[f"{prefix}pixel_values"] = torch.randn(
            (batch, 3, vision.image_size, vision.image_size), generator=generator, device=device
        )
    return inputs


VARIANT_OPTIONS = ("fused", "compile", "tf32", "ckpt")


def parse_variant(variant: str) -> tuple[str, set[str]]:
    """`"bfloat16+fused+compile"` -> ("bfloat16", {"fused", "compile"})."""
    precision, *options = variant.split("+")
    if precision not in ("float32", *DTYPES) or not set(options) <= set(VARIANT_OPTIONS):
        raise SystemExit(f"unknown variant {variant!r}: a precision (float32, bfloat16, float16) followed by any of "
                         f"{', '.join('+' + o for o in VARIANT_OPTIONS)}")
    return precision, set(options)


def run(model_size: str, mode: str, device, batch: int, steps: int, warmup: int, variant: str, seed: int) -> dict:
    """One variant: a precision (float32, or autocast to bfloat16/float16) and options: `fused` (the fused AdamW
    kernel, as `train_accelerate.py` uses on CUDA), `compile` (`torch.compile` of the model), `tf32` (TF32 matmuls),
    `ckpt` (activation checkpointing of CLIP's layers, `train_accelerate.py --activation_checkpointing true`)."""
    precision, options = parse_variant(variant)
    model = build_model(model_size, mode, device, seed).train()
    if "ckpt" in options:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-5, eps=1e-4, weight_decay=1e-4, **({"fused": True} if "fused" in options else {})
    )
    torch.backends.cuda.matmul.allow_tf32 = "tf32" in options
    torch.backends.cudnn.allow_tf32 = "tf32" in options
    forward = torch.compile(model) if "compile" in options else model
    generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    inputs = random_batch(model, batch, device, generator)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
        if precision != "float32" else contextlib.nullcontext()
    )

    def step():
        with autocast:
            loss = forward(**inputs, return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    loss, seconds = timed(lambda: [step() for _ in range(steps)][-1], device)
    synchronize(device)
    if torch.device(device).type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # one more step, untimed, under the profiler
        peak = cpu_allocation_peak(step) if torch.device(device).type == "cpu" else None
    return {
        "model": model_size, "mode": mode, "variant": variant, "precision": precision, "batch": batch, "steps": steps,
        "ms_per_step": 1000 * seconds / steps, "mentions_per_s": batch * steps / seconds,
        "peak_gib": None if peak is None else peak / 2**30, "final_loss": float(loss.detach()),
    }


def main(argv=None):
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__), sizes="0")
    parser.add_argument("--batch", type=int, default=128, help="mentions (and as many gold entities) per step")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="float32,bfloat16", help="comma-separated: a precision (float32, or "
                        "autocast to bfloat16/float16), optionally followed by +fused (fused AdamW), +compile "
                        "(torch.compile), +tf32 (TF32 matmuls), +ckpt (activation checkpointing): e.g. "
                        "float32,bfloat16,bfloat16+fused+compile,float32+ckpt")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.check:
        args.model, args.batch, args.steps, args.warmup = "tiny", 8, 3, 1
        args.variants = "float32,bfloat16+fused,float32+ckpt"
    variants = args.variants.split(",")
    for variant in variants:
        parse_variant(variant)  # refuse a bad list before the first run
    results = []
    for variant in variants:
        results.append(run(args.model, args.mode, args.device, args.batch, args.steps, args.warmup, variant, args.seed))
        # Each variant's line as soon as it is measured: a later one that fails or runs out of time loses nothing.
        result = results[-1]
        peak = "-" if result["peak_gib"] is None else gib(result["peak_gib"] * 2**30)
        print(f"{variant}: {result['ms_per_step']:.1f} ms/step, {result['mentions_per_s']:.0f} mentions/s, peak {peak}",
              flush=True)
    print(f"Training step, {args.model} model, {args.mode}, batch {args.batch}, {args.steps} timed steps; "
          f"{machine(args.device)}")
    where = "one step's allocations above the memory held before it" if args.device == "cpu" else "allocated"
    print(markdown_table(
        ["variant", "ms/step", "mentions/s", f"peak memory ({where})", "loss after"],
        [[r["variant"], f"{r['ms_per_step']:.1f}", f"{r['mentions_per_s']:.0f}",
          "-" if r["peak_gib"] is None else gib(r["peak_gib"] * 2**30), f"{r['final_loss']:.3f}"] for r in results],
    ))
    for result in results:
        if not torch.isfinite(torch.tensor(result["final_loss"])):
            raise SystemExit(f"non-finite loss in {result['variant']}")
    write_json(args.json, {"machine": machine(args.device), "results": results})


if __name__ == "__main__":
    main()
