"""The fused G2L kernel compiled ahead of time for NVIDIA GPUs, on a machine that has none: for every target, dtype
and G2L block (text, image) of a model, what the launch in `kernels_m3el.py` would compile, and what the compiled code
uses: registers and stack (spills) per thread, shared memory (and whether it fits the target), the programs an SM
holds at once by these (occupancy, computed, not measured), and whether the attention products run on tensor cores
(`wgmma` on Hopper, `mma` on Ampere: half precision, and float32 by TF32x3) or on FMA units (float32 with
`"precision": "ieee"`). `--launch FILE` compiles other launches (`check_kernel.py`'s format).

Triton compiles through its own LLVM and `ptxas`; no CUDA driver is needed. The figures hold for the installed
Triton version; the GPU's own Triton (bundled with its PyTorch) may differ: to check another version, install it
beside the first (`pip install --no-deps --target DIR triton==X.Y.Z`) and run with `PYTHONPATH=DIR`.

    python benchmarks/kernel_compile.py --model b32                    # sm_80 and sm_90, ViT-B/32 widths
    python benchmarks/kernel_compile.py --check                        # the tiny model, for tests
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from common import add_launch_argument, apply_launch, feature_shapes, markdown_table, write_json

from modeling_m3el import M3ELConfig, kernels_m3el
from modeling_m3el.kernels_m3el import triton
from modeling_m3el.tiny import tiny_config, tiny_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
# The most shared memory one block may use (opt-in), per compute capability: a kernel that asks for more compiles
# but fails at launch ("out of resources"), and the ranker then falls back to PyTorch.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Per SM: shared memory (bytes, of which 1 KiB per program is reserved by the driver), registers, warps.
SM_SHARED = {80: 167936, 86: 102400, 89: 102400, 90: 233472}
SM_WARPS = {80: 64, 86: 48, 89: 48, 90: 64}
SM_REGISTERS = 65536
# PTX's tensor-core matrix products: `wgmma.mma_async` (Hopper's warp-group MMA) and `mma.sync` (Ampere's, which
# Triton also emits on Hopper for shapes too small for a warp group).
TENSOR_CORE = re.compile(r"^\s*(wgmma\.mma_async|mma\.sync)\.", re.MULTILINE)


def widths(config: M3ELConfig) -> dict[str, tuple[int, int, int]]:
    """(entity tokens, mention tokens, channels) of the text and image G2L grids: both sides of a block are of one
    modality, so the two token counts are equal."""
    shapes = feature_shapes(config)
    d = config.matching_dim
    return {"text": (shapes["text_tokens"][0],) * 2 + (d,), "image": (shapes["image_tokens"][0],) * 2 + (d,)}


def signature(kernel, dtype: torch.dtype, has_mask: bool, constants: dict) -> tuple[dict, dict]:
    """The kernel's argument types as its launch passes them, and the alignment Triton's launcher finds for them
    (every pointer 16-byte aligned, as PyTorch allocates)."""
    arg_names = kernel.arg_names
    types = {}
    for name in arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in ("query_ptr", "key_ptr", "value_ptr"):
            types[name] = POINTER[dtype]
        elif name == "needed_ptr":
            types[name] = "*i8" if has_mask else "*fp32"  # without a mask the launch passes the output
        elif name == "candidates_ptr":
            types[name] = "*i64"
        elif name in ("item_mention_ptr", "item_first_ptr", "extent_ptr"):
            types[name] = "*i32"  # the work list, `kernels_m3el.candidate_programs`
        elif name.endswith("_ptr"):
            types[name] = "*fp32"
        elif name.startswith("num_"):
            types[name] = "i32"
        else:
            types[name] = "fp32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(arg_names) if types[name].startswith("*")}
    return types, attrs


def resources(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, from `cuobjdump -res-usage` (shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}


def programs_per_sm(capability: int, registers: int, shared: int, warps: int) -> int:
    """How many programs of the kernel an SM holds at once (the occupancy calculator's arithmetic: registers
    allocated per warp in units of 256, shared memory plus the 1 KiB the driver reserves per program, warps)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = (SM_REGISTERS // per_warp) // warps
    by_shared = SM_SHARED.get(capability, 102400) // (shared + 1024)
    return max(0, min(by_registers, by_shared, SM_WARPS.get(capability, 48) // warps, 32))


GRIDS = ("no", "yes", "candidates")  # the grid without a mask, with one, and the candidates kernel


def compile_for(capability: int, dtype: torch.dtype, lq: int, lk: int, d: int, grid: str) -> dict:
    """`grid`: one of `GRIDS`."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if grid == "candidates":
        kernel = kernels_m3el._g2l_candidates_kernel
        constants, options = kernels_m3el.candidate_launch_parameters(lq, lk, d, dtype)
    else:
        kernel = kernels_m3el._g2l_grid_kernel
        constants, options = kernels_m3el.launch_parameters(lq, lk, d, dtype, grid == "yes")
    types, attrs = signature(kernel, dtype, grid == "yes", constants)
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, types, constants, attrs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    seconds = time.perf_counter() - start
    ptx = compiled.asm["ptx"]
    used = resources(compiled.asm["cubin"])
    return {
        **used,
        "programs_per_sm": programs_per_sm(capability, used["registers"], int(compiled.metadata.shared),
                                           options["num_warps"]),
        "shared_bytes": int(compiled.metadata.shared),
        "shared_fits": int(compiled.metadata.shared) <= SHARED_LIMIT.get(capability, 101376),
        "num_warps": options["num_warps"],
        "tensor_core_instructions": len(TENSOR_CORE.findall(ptx)),
        "fma_instructions": len(re.findall(r"^\s*fma\.rn\.f32", ptx, re.MULTILINE)),
        "compile_seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "b32"), default="b32")
    parser.add_argument("--targets", default="80,90", help="compute capabilities: 80 (A100), 90 (H100, H200)")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--float32-precision", choices=("ieee", "tf32x3"), default=None,
                        help="float32 products (default: the launch's, kernels_m3el.LAUNCH['float32'])")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_launch_argument(parser)
    parser.add_argument("--check", action="store_true", help="the tiny model (for tests)")
    args = parser.parse_args(argv)
    if triton is None:
        print("Triton is not installed: pip install -e '.[kernels]'", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("TRITON_INTERPRET=1 is set: unset it to compile", file=sys.stderr)
        return 1
    refused = kernels_m3el.compiled_kernel_refused()
    if refused is not None:  # (the runtime does not compile it either: it takes the PyTorch path)
        print(refused, file=sys.stderr)
        return 1
    if args.check:
        args.model = "tiny"
    apply_launch(args.launch)
    if args.float32_precision:
        kernels_m3el.LAUNCH["float32"] = {**kernels_m3el.LAUNCH["float32"], "precision": args.float32_precision}
    config = tiny_config(tiny_processor()) if args.model == "tiny" else M3ELConfig()
    rows, results = [], []
    for capability in (int(t) for t in args.targets.split(",")):
        for dtype_name in args.dtypes.split(","):
            for block, (lq, lk, d) in widths(config).items():
                for grid in GRIDS:
                    result = compile_for(capability, DTYPES[dtype_name], lq, lk, d, grid)
                    precision = kernels_m3el.LAUNCH["float32"]["precision"] if dtype_name == "float32" else "native"
                    results.append({"target": f"sm_{capability}", "dtype": dtype_name, "precision": precision,
                                    "block": block, "widths": [lq, lk, d], "grid": grid, **result})
                    rows.append([f"sm_{capability}", f"{dtype_name} ({precision})", f"{block} {lq}x{lk}x{d}",
                                 grid, result["num_warps"], result["registers"],
                                 result["stack_bytes"], f"{result['shared_bytes'] / 1024:.0f}"
                                 + ("" if result["shared_fits"] else " (too much)"), result["programs_per_sm"],
                                 result["tensor_core_instructions"], result["fma_instructions"]])
    print(f"Triton {triton.__version__}, {args.model} widths (entity tokens x mention tokens x channels)\n")
    print(markdown_table(["target", "dtype", "G2L block", "mask (or candidates)", "warps", "registers/thread",
                          "stack (spill) B", "shared KiB", "programs per SM", "tensor-core instr.", "FMA instr."],
                         rows))
    write_json(args.json, {"model": args.model, "triton": triton.__version__, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
