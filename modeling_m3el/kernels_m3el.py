"""
A fused Triton kernel for M3EL's global-to-local (G2L) scores of every (mention, entity) pair of a grid (SPEC 4.1).

For one pair it computes, without writing anything but the final score:
`g2l[b, e] = <c_e, LN(mean_i softmax_j(Q_e[i] . K_b[j]) U_b)>`, the keys already scaled by 1/sqrt(d). A program
loads one entity's queries once and walks a block of mentions, so the (entity tokens x mention tokens) attention of
a pair only ever lives in registers; the plain PyTorch path writes and re-reads it for every pair. An optional
(B, E) mask says which pairs are needed: the others are skipped (their entry of the output is left at 0), which is
how the pruned exact ranker scores only the pairs its bounds leave undecided.

Used on CUDA when Triton is installed (it comes with PyTorch's CUDA builds) and no gradient is needed; everything
else takes the PyTorch path in `modeling_m3el.py`. `M3EL_G2L_KERNEL=torch` turns the kernel off, `=triton` forces
it (on a CPU only with `TRITON_INTERPRET=1`, Triton's interpreter, which the tests use).
"""

import contextlib
import os
import warnings

import torch

try:  # optional: absent on CPU-only installs
    import triton
    import triton.language as tl
except ImportError:
    triton = None

KERNEL_ENV = "M3EL_G2L_KERNEL"
FALLBACK = "the fused G2L kernel failed"  # how the warning of a fallback to the PyTorch path begins
# How float32 attention products are computed: "ieee", exact float32 on FMA units (what the exact ranker promises);
# `benchmarks/check_kernel.py` also measures "tf32x3" (three TF32 tensor-core products, close to float32).
FLOAT32_PRECISION = "ieee"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Set when the kernel failed to compile or run in "auto" mode: this process then keeps to the PyTorch path.
_kernel_failure: str | None = None
# Inside `strict()`: a failure raises (the caller falls back in its own way) instead of falling back here.
_strict = False


class FusedKernelError(RuntimeError):
    """The fused kernel failed to compile or run (raised inside `strict()`; the original error is its cause)."""


def fused_g2l_wanted(query: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether `global_to_local` should use the fused kernel for these tensors (see the module docstring)."""
    choice = os.environ.get(KERNEL_ENV, "auto")
    if choice not in ("auto", "triton", "torch"):
        raise ValueError(f"{KERNEL_ENV} must be auto, triton or torch, got {choice!r}")
    if choice == "torch" or triton is None or query.dtype not in KERNEL_DTYPES:
        return False
    if choice == "auto" and _kernel_failure is not None:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, *tensors)):
        return False  # training: the kernel has no backward pass
    return choice == "triton" or query.is_cuda


if triton is not None:

    @triton.jit
    def _g2l_grid_kernel(
        query_ptr, key_ptr, value_ptr, scaled_global_ptr, global_bias_ptr, needed_ptr, out_ptr,
        num_mentions, num_entities, eps,
        LQ: tl.constexpr, LK: tl.constexpr, D: tl.constexpr,
        LQP: tl.constexpr, LKP: tl.constexpr, DP: tl.constexpr,
        BLOCK_B: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        entity = tl.program_id(0).to(tl.int64)  # 64-bit offsets: E * LQ * D passes 2**31 for large chunks
        first = tl.program_id(1).to(tl.int64) * BLOCK_B
        rows_q, rows_k, dims = tl.arange(0, LQP), tl.arange(0, LKP), tl.arange(0, DP)
        mentions = first + tl.arange(0, BLOCK_B)
        active = mentions < num_mentions
        if HAS_MASK:
            active = active & (tl.load(needed_ptr + mentions * num_entities + entity, mask=active, other=0) != 0)
        if tl.sum(active.to(tl.int32), axis=0) > 0:
            in_d = dims < D
            query = tl.load(
                query_ptr + entity * (LQ * D) + rows_q[:, None] * D + dims[None, :],
                mask=(rows_q[:, None] < LQ) & in_d[None, :], other=0.0,
            )
            if UPCAST:
                query = query.to(tl.float32)
            scaled_global = tl.load(scaled_global_ptr + entity * D + dims, mask=in_d, other=0.0).to(tl.float32)
            bias = tl.load(global_bias_ptr + entity).to(tl.float32)
            token_mask = (rows_k[:, None] < LK) & in_d[None, :]
            for i in range(BLOCK_B):
                mention = first + i
                take = mention < num_mentions
                if HAS_MASK:
                    take = take & (tl.load(needed_ptr + mention * num_entities + entity, mask=take, other=0) != 0)
                if take:
                    offsets = mention * (LK * D) + rows_k[:, None] * D + dims[None, :]
                    key = tl.load(key_ptr + offsets, mask=token_mask, other=0.0)
                    if UPCAST:
                        key = key.to(tl.float32)
                    value = tl.load(value_ptr + offsets, mask=token_mask, other=0.0).to(tl.float32)
                    if PRECISION == "":  # half precision: the tensor cores' own products
                        scores = tl.dot(query, tl.trans(key))
                    else:  # float32: "ieee" (FMA units) or "tf32x3" (three TF32 tensor-core products)
                        scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)
                    # softmax over the mention's tokens (no padding mask in the model: only the block's padding)
                    scores = tl.where(rows_k[None, :] < LK, scores, float("-inf"))
                    scores = tl.exp(scores - tl.max(scores, axis=1)[:, None])
                    attention = scores / tl.sum(scores, axis=1)[:, None]
                    attention = tl.where(rows_q[:, None] < LQ, attention, 0.0)
                    weights = tl.sum(attention, axis=0) / LQ  # mean over the entity's tokens, (LKP,)
                    context = tl.sum(weights[:, None] * value, axis=0)  # (DP,)
                    # LayerNorm over the D channels, folded into the dot with c_e: <c, gamma n + beta>
                    mean = tl.sum(context, axis=0) / D
                    centered = tl.where(in_d, context - mean, 0.0)
                    variance = tl.sum(centered * centered, axis=0) / D
                    normalized = centered / tl.sqrt(variance + eps)
                    tl.store(out_ptr + mention * num_entities + entity, tl.sum(normalized * scaled_global, axis=0) + bias)


def record_failure(error: Exception) -> None:
    """Turn the kernel off for this process ("auto" mode), with one warning that says why."""
    global _kernel_failure
    if isinstance(error, FusedKernelError) and error.__cause__ is not None:
        error = error.__cause__
    _kernel_failure = f"{type(error).__name__}: {error}"
    warnings.warn(f"{FALLBACK} ({_kernel_failure[:500]}); using the PyTorch path instead")


@contextlib.contextmanager
def strict():
    """Within this block a kernel failure raises instead of falling back, so that the caller can fall back itself
    (the exact ranker then scores its grid in memory-bounded pieces; the PyTorch path needs far more memory)."""
    global _strict
    previous, _strict = _strict, True
    try:
        yield
    finally:
        _strict = previous


def try_fused_global_to_local(*args, **kwargs) -> torch.Tensor | None:
    """
    `fused_global_to_local`, or None (with one warning) if the kernel fails to compile or run in "auto" mode, after
    which this process uses the PyTorch path. With `M3EL_G2L_KERNEL=triton`, or inside `strict()`, a failure raises.
    """
    try:
        return fused_global_to_local(*args, **kwargs)
    except Exception as error:  # Triton's compile and launch errors have no common base class
        if os.environ.get(KERNEL_ENV, "auto") == "triton":
            raise
        if _strict:
            raise FusedKernelError(f"{type(error).__name__}: {error}") from error
        record_failure(error)
        return None


def _padded(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def launch_parameters(
    lq: int, lk: int, d: int, dtype: torch.dtype, has_mask: bool, block_mentions: int = 32
) -> tuple[dict, dict]:
    """The kernel's compile-time constants and compile options (warps, FP fusion) for these widths (entity tokens
    `lq`, mention tokens `lk`, channels `d`): what `fused_global_to_local` launches, and what
    `benchmarks/kernel_compile.py` compiles ahead of time for a GPU the machine need not have."""
    lqp, lkp, dp = _padded(lq), _padded(lk), _padded(d)
    precision = FLOAT32_PRECISION if dtype == torch.float32 else ""
    constants = {
        "LQ": lq, "LK": lk, "D": d, "LQP": lqp, "LKP": lkp, "DP": dp,
        "BLOCK_B": block_mentions, "HAS_MASK": has_mask, "PRECISION": precision,
        # Triton's CPU interpreter multiplies half-precision dot operands wrongly (triton 3.9): upcast there only.
        "UPCAST": os.environ.get("TRITON_INTERPRET") == "1" and dtype != torch.float32,
    }
    # FP fusion (multiply-adds fused) stated rather than left to Triton's default, which Triton 3.9 warns about
    options = {"num_warps": warps_for(lqp, lkp, dp, precision), "enable_fp_fusion": True}
    return constants, options


def warps_for(lqp: int, lkp: int, dp: int, precision: str) -> int:
    """Warps per program. Small tiles: 4. From B/32 widths on (query, keys and values of 64 x 128): 8, except for
    float32 products on FMA units (`precision` "ieee"), which hold more in registers: with 8 warps a thread needs
    224-255 registers, the most there are (Triton 3.6 and 3.9, sm_80 and sm_90), with 16 warps 64-122, twice as
    many warps resident per SM (`benchmarks/kernel_compile.py`; `benchmarks/check_kernel.py` times both). Half
    precision (`precision` "") and TF32x3 take 8."""
    if max(lqp, lkp) * dp < 8192:
        return 4
    return 16 if precision == "ieee" else 8


def fused_global_to_local(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    entity_global: torch.Tensor,
    norm: torch.nn.LayerNorm,
    needed: torch.Tensor | None = None,
    block_mentions: int = 32,
) -> torch.Tensor:
    """
    G2L scores (B, E), float32, of mentions (`key` already scaled by 1/sqrt(d), `value`: (B, LK, d)) against
    entities (`query`: (E, LQ, d), `entity_global`: (E, d)), with the context LayerNorm `norm`. With `needed`, a
    (B, E) bool mask, only those pairs are computed; the other entries are 0. `block_mentions`: mentions per program
    (an entity's queries are read from memory once per block; the block's keys and values stay in cache).
    """
    num_entities, lq, d = query.shape
    num_mentions, lk, _ = key.shape
    dtype = query.dtype
    key, value = key.to(dtype).contiguous(), value.to(dtype).contiguous()
    query = query.contiguous()
    # <c, gamma n + beta> = <c * gamma, n> + <c, beta>: both vectors depend on the entity alone.
    gamma, beta = norm.weight.float(), norm.bias.float()
    entity_global = entity_global.float()
    scaled_global = (entity_global * gamma).contiguous()
    global_bias = (entity_global @ beta).contiguous()
    out = torch.zeros((num_mentions, num_entities), dtype=torch.float32, device=query.device)
    if needed is not None:
        if needed.shape != (num_mentions, num_entities):
            raise ValueError(f"needed must have shape {(num_mentions, num_entities)}, got {tuple(needed.shape)}")
        needed = needed.to(device=query.device, dtype=torch.int8).contiguous()
    grid = (num_entities, triton.cdiv(num_mentions, block_mentions))
    constants, options = launch_parameters(lq, lk, d, dtype, needed is not None, block_mentions)
    _g2l_grid_kernel[grid](
        query, key, value, scaled_global, global_bias, needed if needed is not None else out, out,
        num_mentions, num_entities, float(norm.eps), **constants, **options,
    )
    return out
