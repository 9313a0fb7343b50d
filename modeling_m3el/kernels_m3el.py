"""
A fused Triton kernel for M3EL's global-to-local (G2L) scores of every (mention, entity) pair of a grid.

For one pair it computes, without writing anything but the final score:
`g2l[b, e] = <c_e, LN(mean_i softmax_j(Q_e[i] . K_b[j]) U_b)>`, the keys already scaled by 1/sqrt(d). A program
loads the token rows of a few consecutive entities once (one tile: rows of several entities, so that one tensor-core
product serves them all) and walks a block of mentions: per mention, the attention of every row over the mention's
tokens, its softmax (a row's own), the mean over each entity's rows and the weighted sum of the values (two small
products), the LayerNorm and the dot with c_e. The (entity tokens x mention tokens) attention of a pair is never
written to memory; the plain PyTorch path writes and re-reads it for every pair. An optional (B, E) mask says which
pairs are needed: a mention is skipped for a program whose entities it needs none of, and only needed entries are
written (the others are left at 0), which is how the pruned exact ranker scores only the pairs its bounds leave
undecided. The numbers of mentions and entities are not compiled in: a new batch or KB size does not recompile.

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
# How the kernel is launched, per index dtype ("float32"; "half": bfloat16 and float16):
# - rows: a program's query rows, the token rows of as many whole entities as fit (256 rows hold 6 entities of 40
#   text tokens or 5 of 50 image tokens; 128 rows 3 or 2);
# - warps (4 for tiles smaller than 128 x 128);
# - stages: Triton's software-pipeline stages (`num_stages`): the grid without a mask can prefetch the next
#   mentions' keys and values into shared memory, 48-64 KiB a stage at B/32 widths (Triton's default of 3 would pass
#   the 227 KiB of an H100's SM in float32); 1 is what the H200 measurements below ran (their loop had a branch,
#   which Triton does not pipeline);
# - mentions: mentions a program step takes (default 1); with 2 or 4 their keys sit side by side in one product, so
#   a step's layout conversions and barriers serve more pairs (checked in the interpreter and compiled; not yet
#   timed on a GPU: `benchmarks/check_kernel.py` times it as a variant);
# - precision (float32): "tf32x3", three TF32 tensor-core products (each operand split into a TF32 part and its
#   remainder; error near float32's), or "ieee", float32 on FMA units;
# - registers: the most registers a thread may use (Triton's `maxnreg`; default: as many as the compiler wants).
#   Compiled for sm_90, the bf16 kernels take 150-175 registers a thread, which leaves room for one program of 8
#   warps per SM (65,536 registers); at 128 a second program fits beside it, whose work can hide the first one's
#   waits (loads, barriers), at the cost of a few spilled registers (`benchmarks/kernel_compile.py`);
# - the candidates kernel (`rank` and `topk`'s pruned pairs, two-stage re-scoring) takes the same launch unless the
#   launch says otherwise for it: candidate_rows, candidate_warps, candidate_registers (default: rows, warps,
#   registers), candidate_stages (its pipeline stages; default 1, whatever `stages` is), and hoist (default False):
#   a program's mention keys and values loaded once, before its loop over tiles of that mention's entities, rather
#   than at every step (compiled for sm_90 it needs fewer registers, with no spill in float32, and more shared
#   memory). `benchmarks/check_kernel.py` times each kernel's variants on its own work and keeps the fastest of
#   each.
# The fastest that agreed with the PyTorch path on an H200 (benchmarks/README.md, "GPU"): float32 by TF32x3 took
# 20.6 ms where IEEE took 300-580 ms and PyTorch's float32 path 47 ms, with the same largest difference from PyTorch
# (1.5e-5), every pruned rank equal, and the exact ranks at 109,976 entities identical to the authors' loop; bf16 at
# 256 rows 8.6 ms (128 rows: 10.1 ms). On 2026-11-28 the candidates kernel's options were timed too (64 mentions,
# each against a quarter of 4,096 entities): in float32 the hoisted mention took 9.6 ms against 9.9 without and 12.7
# with 128 registers; in half precision none beat the grid's own launch by more than the run-to-run spread (4.6-4.9
# ms against 4.9). `benchmarks/check_kernel.py` times the alternatives on a GPU.
LAUNCH = {
    "float32": {"rows": 128, "warps": 8, "stages": 1, "precision": "tf32x3", "hoist": True},
    "half": {"rows": 256, "warps": 8, "stages": 1},
}
# Candidate tiles a program of the candidates kernel walks (with 6 candidates a tile: 48 candidates a program).
CANDIDATE_STEPS = 8
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The oldest Triton that compiles every launch of the kernels. Triton 3.2 (PyTorch 2.6's) stops the whole process
# compiling the float32 kernel ("LLVM ERROR: Failed to emit transfer from register to shared", sm_80 and sm_90: an
# abort, which no fallback can catch); 3.3 (PyTorch 2.7's) to 3.9 compile them all (`benchmarks/kernel_compile.py`).
# Triton's interpreter (TRITON_INTERPRET=1) runs the kernels with any of these.
MIN_TRITON = (3, 3)
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
    wanted = choice == "triton" or query.is_cuda
    if wanted and (reason := compiled_kernel_refused()) is not None:
        if choice == "triton":
            raise RuntimeError(f"{KERNEL_ENV}=triton: {reason}")
        record_failure(RuntimeError(reason))  # one warning; the PyTorch path from then on
        return False
    return wanted


if triton is not None:

    @triton.jit
    def _layer_norm_dot(context, scaled_global, bias, in_d, eps, D: tl.constexpr):
        """`<c, LN(context)>` over the last (channel) axis, LayerNorm folded into the dot: `<c * gamma, n> + <c,
        beta>`, with `scaled_global` = c * gamma and `bias` = <c, beta> broadcast against the leading axes."""
        mean = tl.sum(context, axis=-1, keep_dims=True) / D
        centered = tl.where(in_d, context - mean, 0.0)
        variance = tl.sum(centered * centered, axis=-1, keep_dims=True) / D
        normalized = centered * (1.0 / tl.sqrt(variance + eps))
        return tl.sum(normalized * scaled_global, axis=-1) + bias

    @triton.jit
    def _entity_globals(scaled_global_ptr, global_bias_ptr, entities, valid, dims, in_d, D: tl.constexpr):
        """The entity vectors `_layer_norm_dot` takes, (EP, DP) and (EP,), float32; 0 where not `valid`."""
        scaled_global = tl.load(
            scaled_global_ptr + entities[:, None] * D + dims[None, :], mask=valid[:, None] & in_d[None, :],
            other=0.0,
        ).to(tl.float32)
        return scaled_global, tl.load(global_bias_ptr + entities, mask=valid, other=0.0).to(tl.float32)

    @triton.jit
    def _load_mention(key_ptr, value_ptr, mention, tokens, dims, token_mask, LK: tl.constexpr, D: tl.constexpr,
                      UPCAST: tl.constexpr):
        """One mention's keys (LKP, DP), in the index's dtype, and values (LKP, DP), float32; 0 past LK and D."""
        offsets = mention * (LK * D) + tokens[:, None] * D + dims[None, :]
        key = tl.load(key_ptr + offsets, mask=token_mask, other=0.0)
        if UPCAST:
            key = key.to(tl.float32)
        return key, tl.load(value_ptr + offsets, mask=token_mask, other=0.0).to(tl.float32)

    @triton.jit
    def _mention_scores(
        query, segment, scaled_global, bias, key, value, tokens, in_d, eps,
        LQ: tl.constexpr, LK: tl.constexpr, D: tl.constexpr,
        PRECISION: tl.constexpr, SMALL_PRECISION: tl.constexpr,
    ):
        """G2L scores (EP,) of one mention (its keys and values, `_load_mention`) against the entities of a
        program's query tile."""
        if PRECISION == "":  # half precision: the tensor cores' own products
            scores = tl.dot(query, tl.trans(key))  # (ROWS, LKP)
        else:  # float32: "ieee" (FMA units) or "tf32x3" (three TF32 tensor-core products)
            scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)
        # softmax of every query row over the mention's tokens (no padding mask in the model: only the padding of
        # LKP); a row's reductions stay within its warp
        scores = tl.where(tokens[None, :] < LK, scores, float("-inf"))
        scores = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        # the mean over each entity's rows of the normalised rows: the normalisation (and 1/LQ) goes into the
        # (EP, ROWS) segment matrix, a sixteenth of the divisions the (ROWS, LKP) rows would take
        inverse = 1.0 / (tl.sum(scores, axis=1) * LQ)  # (ROWS,)
        weights = tl.dot(segment * inverse[None, :], scores, input_precision=SMALL_PRECISION)  # (EP, LKP)
        context = tl.dot(weights, value, input_precision=SMALL_PRECISION)  # (EP, DP): the weighted values
        return _layer_norm_dot(context, scaled_global, bias, in_d, eps, D)

    @triton.jit
    def _mentions_scores(
        query, segment, scaled_global, bias, key_ptr, value_ptr, first, num_mentions, dims, in_d, eps,
        LQ: tl.constexpr, LK: tl.constexpr, D: tl.constexpr, LKP: tl.constexpr, DP: tl.constexpr, EP: tl.constexpr,
        MB: tl.constexpr, PRECISION: tl.constexpr, SMALL_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        """G2L scores (MB, EP) of MB consecutive mentions (from `first`; those past the batch give scores to
        ignore) against the entities of a program's query tile: their keys side by side in one product."""
        columns = tl.arange(0, MB * LKP)
        which, token = columns // LKP, columns % LKP  # the mention of the step and its token, per key row
        present = (token < LK) & (first + which < num_mentions)
        offsets = (first + which)[:, None] * (LK * D) + token[:, None] * D + dims[None, :]
        key = tl.load(key_ptr + offsets, mask=present[:, None] & in_d[None, :], other=0.0)
        if UPCAST:
            key = key.to(tl.float32)
        value = tl.load(value_ptr + offsets, mask=present[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        if PRECISION == "":
            scores = tl.dot(query, tl.trans(key))  # (ROWS, MB * LKP)
        else:
            scores = tl.dot(query, tl.trans(key), input_precision=PRECISION)
        scores = tl.where((token < LK)[None, :], scores, float("-inf"))
        rows: tl.constexpr = scores.shape[0]
        # softmax of every query row over each mention's tokens, normalised (with 1/LQ) before the per-entity sum
        scores = tl.reshape(scores, (rows, MB, LKP))
        scores = tl.exp(scores - tl.max(scores, axis=2)[:, :, None])
        scores = scores * (1.0 / (tl.sum(scores, axis=2) * LQ))[:, :, None]
        weights = tl.dot(segment, tl.reshape(scores, (rows, MB * LKP)), input_precision=SMALL_PRECISION)
        weights = tl.permute(tl.reshape(weights, (EP, MB, LKP)), (1, 0, 2))  # (MB, EP, LKP)
        context = tl.dot(weights, tl.reshape(value, (MB, LKP, DP)), input_precision=SMALL_PRECISION)  # (MB, EP, DP)
        return _layer_norm_dot(context, scaled_global, bias, in_d, eps, D)  # (MB, EP)

    @triton.jit(do_not_specialize=["num_mentions", "num_entities"])
    def _g2l_grid_kernel(
        query_ptr, key_ptr, value_ptr, scaled_global_ptr, global_bias_ptr, needed_ptr, out_ptr,
        num_mentions, num_entities, eps,
        LQ: tl.constexpr, LK: tl.constexpr, D: tl.constexpr, LKP: tl.constexpr, DP: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_E: tl.constexpr, EP: tl.constexpr, BLOCK_B: tl.constexpr, MB: tl.constexpr,
        HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, SMALL_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # A program: BLOCK_E consecutive entities (their BLOCK_E * LQ token rows, contiguous in memory, padded to
        # ROWS) against BLOCK_B consecutive mentions, one mention at a time. 64-bit offsets: E * LQ * D passes 2**31.
        first_entity = tl.program_id(0).to(tl.int64) * BLOCK_E
        first_mention = tl.program_id(1).to(tl.int64) * BLOCK_B
        rows, tokens, dims, slots = tl.arange(0, ROWS), tl.arange(0, LKP), tl.arange(0, DP), tl.arange(0, EP)
        in_d = dims < D
        row_slot = rows // LQ  # the entity (slot of the block) each query row belongs to
        row_valid = (row_slot < BLOCK_E) & (first_entity + row_slot < num_entities)
        query = tl.load(
            query_ptr + (first_entity * LQ + rows)[:, None] * D + dims[None, :],
            mask=row_valid[:, None] & in_d[None, :], other=0.0,
        )
        if UPCAST:
            query = query.to(tl.float32)
        # (EP, ROWS) 0/1: which rows each entity of the block owns; its product with the softmax rows sums them per
        # entity on the tensor cores
        segment = ((row_slot[None, :] == slots[:, None]) & row_valid[None, :]).to(tl.float32)
        entities = first_entity + slots
        slot_valid = (slots < BLOCK_E) & (entities < num_entities)
        scaled_global, bias = _entity_globals(scaled_global_ptr, global_bias_ptr, entities, slot_valid, dims, in_d, D)
        token_mask = (tokens[:, None] < LK) & in_d[None, :]
        count = tl.minimum(num_mentions - first_mention, BLOCK_B)  # the last block is cut to the batch
        if MB > 1:  # MB mentions a step
            steps = tl.arange(0, MB)
            for i in range(0, count, MB):
                mentions = first_mention + i + steps
                wanted = slot_valid[None, :] & (mentions < num_mentions)[:, None]  # (MB, EP)
                places = mentions[:, None] * num_entities + entities[None, :]
                if HAS_MASK:
                    wanted = wanted & (tl.load(needed_ptr + places, mask=wanted, other=0) != 0)
                if tl.max(tl.max(wanted.to(tl.int32), axis=1), axis=0) > 0:
                    score = _mentions_scores(
                        query, segment, scaled_global, bias, key_ptr, value_ptr, first_mention + i, num_mentions,
                        dims, in_d, eps, LQ, LK, D, LKP, DP, EP, MB, PRECISION, SMALL_PRECISION, UPCAST,
                    )
                    tl.store(out_ptr + places, score, mask=wanted)
        else:  # one mention a step (a batch of one computes one mention, not BLOCK_B)
            for i in range(0, count):
                mention = first_mention + i
                if HAS_MASK:  # a mention none of whose pairs with these entities is needed is skipped
                    needed = tl.load(needed_ptr + mention * num_entities + entities, mask=slot_valid, other=0)
                    wanted = slot_valid & (needed != 0)
                    if tl.max(wanted.to(tl.int32), axis=0) > 0:
                        key, value = _load_mention(key_ptr, value_ptr, mention, tokens, dims, token_mask, LK, D,
                                                   UPCAST)
                        score = _mention_scores(
                            query, segment, scaled_global, bias, key, value, tokens, in_d, eps, LQ, LK, D,
                            PRECISION, SMALL_PRECISION,
                        )
                        tl.store(out_ptr + mention * num_entities + entities, score, mask=wanted)
                else:  # no branch in the loop: Triton can pipeline it (prefetch the next mentions' keys and values)
                    key, value = _load_mention(key_ptr, value_ptr, mention, tokens, dims, token_mask, LK, D, UPCAST)
                    score = _mention_scores(
                        query, segment, scaled_global, bias, key, value, tokens, in_d, eps, LQ, LK, D, PRECISION,
                        SMALL_PRECISION,
                    )
                    tl.store(out_ptr + mention * num_entities + entities, score, mask=slot_valid)


    @triton.jit(do_not_specialize=["num_candidates"])
    def _g2l_candidates_kernel(
        query_ptr, key_ptr, value_ptr, scaled_global_ptr, global_bias_ptr, candidates_ptr, item_mention_ptr,
        item_first_ptr, extent_ptr, out_ptr, num_candidates, eps,
        LQ: tl.constexpr, LK: tl.constexpr, D: tl.constexpr, LKP: tl.constexpr, DP: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_E: tl.constexpr, EP: tl.constexpr, STEPS: tl.constexpr, HOIST: tl.constexpr,
        PRECISION: tl.constexpr, SMALL_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # A program: one work item (`candidate_programs`), a mention and up to STEPS tiles of its list of entity rows
        # (-1: none) from `first`, BLOCK_E entries a tile, up to the list's extent (its last listed entity), so that
        # the padding after it costs nothing. The listed entities' token rows are gathered from the index
        # (contiguous within an entity). The loop has no branch (a tile of -1 only, from a gap in a list, is
        # computed and not stored), so that Triton may pipeline it; with HOIST the mention's keys and values are
        # loaded once, before it, rather than at every step.
        item = tl.program_id(0)
        mention = tl.load(item_mention_ptr + item).to(tl.int64)
        first = tl.load(item_first_ptr + item).to(tl.int64)
        stop = tl.minimum(first + BLOCK_E * STEPS, tl.load(extent_ptr + mention).to(tl.int64))
        rows, tokens, dims, slots = tl.arange(0, ROWS), tl.arange(0, LKP), tl.arange(0, DP), tl.arange(0, EP)
        in_d = dims < D
        row_slot = rows // LQ
        token_mask = (tokens[:, None] < LK) & in_d[None, :]
        listed = candidates_ptr + mention * num_candidates
        if HOIST:
            key, value = _load_mention(key_ptr, value_ptr, mention, tokens, dims, token_mask, LK, D, UPCAST)
        for start in range(first, stop, BLOCK_E):
            places = start + slots
            entities = tl.load(listed + places, mask=(slots < BLOCK_E) & (places < stop), other=-1)
            slot_valid = entities >= 0
            row_listed = (row_slot < BLOCK_E) & (start + row_slot < stop)
            row_entity = tl.load(listed + start + row_slot, mask=row_listed, other=-1)  # each row's entity
            row_valid = row_entity >= 0
            query = tl.load(
                query_ptr + (row_entity * LQ + rows % LQ)[:, None] * D + dims[None, :],
                mask=row_valid[:, None] & in_d[None, :], other=0.0,
            )
            if UPCAST:
                query = query.to(tl.float32)
            segment = ((row_slot[None, :] == slots[:, None]) & row_valid[None, :]).to(tl.float32)
            scaled_global, bias = _entity_globals(
                scaled_global_ptr, global_bias_ptr, entities, slot_valid, dims, in_d, D
            )
            if not HOIST:
                key, value = _load_mention(key_ptr, value_ptr, mention, tokens, dims, token_mask, LK, D, UPCAST)
            score = _mention_scores(
                query, segment, scaled_global, bias, key, value, tokens, in_d, eps, LQ, LK, D, PRECISION,
                SMALL_PRECISION,
            )
            tl.store(out_ptr + mention * num_candidates + places, score, mask=slot_valid)


def major_minor(version: str) -> tuple[int, int]:
    """(3, 3) of "3.3.1+git1a2b3c"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def compiled_kernel_refused() -> str | None:
    """Why the kernels must not be compiled with the installed Triton (None: they may), `MIN_TRITON`; the interpreter
    compiles nothing."""
    if triton is None or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if major_minor(triton.__version__) >= MIN_TRITON:
        return None
    minimum = ".".join(map(str, MIN_TRITON))
    return (
        f"Triton {triton.__version__} aborts the process compiling the fused G2L kernel; it needs Triton {minimum} or "
        f"newer (PyTorch 2.7 or newer brings it)"
    )


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
    return max(16, 1 << (size - 1).bit_length())  # the next power of two, at least 16


def _key(dtype: torch.dtype) -> str:
    """`LAUNCH`'s entry for an index of `dtype`."""
    return "float32" if dtype == torch.float32 else "half"


# The candidates kernel's own keys of a launch, in place of the grid's (absent: the grid's; stages: 1).
CANDIDATE_KEYS = {"rows": "candidate_rows", "warps": "candidate_warps", "stages": "candidate_stages",
                  "registers": "candidate_registers"}


def resolve_launch(launch: dict, candidates: bool = False) -> dict:
    """What the grid kernel (or, with `candidates`, the candidates kernel) takes from a launch of `LAUNCH`'s format,
    defaults filled in: rows, warps, stages, registers and precision, and mentions (grid) or hoist (candidates)."""
    resolved = {"rows": launch["rows"], "warps": launch["warps"], "stages": launch.get("stages", 1),
                "registers": launch.get("registers"), "precision": launch.get("precision", "")}
    if not candidates:
        return {**resolved, "mentions": launch.get("mentions", 1)}
    own = {key: launch[name] for key, name in CANDIDATE_KEYS.items() if name in launch}
    # its own stages (default 1): at the grid's 2 its loop (no branch) would be pipelined past the shared memory of
    # an SM
    return {**resolved, "stages": 1, **own, "hoist": launch.get("hoist", False)}


def _launch(dtype: torch.dtype, candidates: bool = False) -> dict:
    """`resolve_launch` of `LAUNCH`'s entry for an index of `dtype`."""
    return resolve_launch(LAUNCH[_key(dtype)], candidates)


def _tile_rows(lq: int, dtype: torch.dtype, candidates: bool = False) -> int:
    """A program's query rows: the launch's rows (`LAUNCH`), at least one entity's `lq` (padded)."""
    return max(_launch(dtype, candidates)["rows"], _padded(lq))


def entities_per_step(lq: int, dtype: torch.dtype, candidates: bool = False) -> int:
    """Entities a program step of the grid kernel (or, with `candidates`, of the candidates kernel) covers (a tile:
    as many whole entities of `lq` token rows as fit the launch's rows, `LAUNCH`), e.g. 6 of 40 text tokens or 5 of 50
    image tokens in 256 rows (bf16), 3 or 2 in 128 (float32)."""
    return _tile_rows(lq, dtype, candidates) // lq


def _parameters(
    lq: int, lk: int, d: int, dtype: torch.dtype, candidates: bool, has_mask: bool = False, block_mentions: int = 32
) -> tuple[dict, dict]:
    launch = _launch(dtype, candidates)
    lkp, dp = _padded(lk), _padded(d)
    rows = _tile_rows(lq, dtype, candidates)  # a program's query rows: as many whole entities as fit
    block_entities = rows // lq
    precision = launch["precision"]  # "": half precision, the tensor cores' own products
    constants = {
        "LQ": lq, "LK": lk, "D": d, "LKP": lkp, "DP": dp,
        "ROWS": rows, "BLOCK_E": block_entities, "EP": _padded(block_entities), "BLOCK_B": block_mentions,
        "MB": launch.get("mentions", 1),  # (the candidates kernel takes none)
        "HAS_MASK": has_mask, "PRECISION": precision,
        # the two small products (per-entity sums of the attention, then the values): float32's own precision for
        # a float32 index, TF32 for a half-precision one (finer than the bf16/fp16 inputs)
        "SMALL_PRECISION": precision or "tf32",
        # Triton's CPU interpreter multiplies half-precision dot operands wrongly (triton 3.9): upcast there only.
        "UPCAST": os.environ.get("TRITON_INTERPRET") == "1" and dtype != torch.float32,
    }
    # FP fusion (multiply-adds fused) stated rather than left to Triton's default, which Triton 3.9 warns about
    warps = 4 if rows * dp < 16384 else launch["warps"]
    options = {"num_warps": warps, "num_stages": launch["stages"], "enable_fp_fusion": True}
    if launch["registers"]:
        options["maxnreg"] = launch["registers"]
    return constants, options


def launch_parameters(
    lq: int, lk: int, d: int, dtype: torch.dtype, has_mask: bool, block_mentions: int = 32
) -> tuple[dict, dict]:
    """The grid kernel's compile-time constants and compile options (warps, stages, registers, FP fusion) for these
    widths (entity tokens `lq`, mention tokens `lk`, channels `d`) by `LAUNCH`: what `fused_global_to_local`
    launches, and what `benchmarks/kernel_compile.py` compiles ahead of time for a GPU the machine need not have."""
    return _parameters(lq, lk, d, dtype, False, has_mask, block_mentions)


def candidate_launch_parameters(lq: int, lk: int, d: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """`launch_parameters` for the candidates kernel: its own launch (`LAUNCH`'s candidate_* keys, else the grid's),
    `CANDIDATE_STEPS` tiles a program."""
    constants, options = _parameters(lq, lk, d, dtype, True)
    constants = {k: v for k, v in constants.items() if k not in ("BLOCK_B", "MB", "HAS_MASK")}
    return {**constants, "STEPS": CANDIDATE_STEPS, "HOIST": _launch(dtype, True)["hoist"]}, options


def candidate_programs(candidates: torch.Tensor, per_program: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The candidates kernel's work list for (B, K) lists of entity rows (-1: none): `(item_mention, item_first,
    extent)`, int32. A list's extent is one past its last listed entry (0 for a list of none); each work item (a
    program) takes one mention and `per_program` entries of its list from `item_first`, up to the extent, so that
    the programs cover every listed entry once and none is launched for the padding after a list's last entry
    (lists of very different lengths padded to the longest: the pruned ranker's undecided pairs per mention).
    """
    num_mentions, width = candidates.shape
    positions = torch.arange(1, width + 1, device=candidates.device)
    extent = torch.where(candidates >= 0, positions, 0).amax(dim=1)  # (B,)
    programs = (extent + per_program - 1) // per_program
    item_mention = torch.repeat_interleave(torch.arange(num_mentions, device=candidates.device), programs)
    first_item = torch.cumsum(programs, 0) - programs  # each mention's first item
    slot = torch.arange(item_mention.numel(), device=candidates.device) - first_item[item_mention]
    item_first = slot * per_program
    return item_mention.int(), item_first.int(), extent.int()


def fused_global_to_local(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    entity_global: torch.Tensor,
    norm: torch.nn.LayerNorm,
    needed: torch.Tensor | None = None,
    block_mentions: int = 32,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    G2L scores (B, E), float32, of mentions (`key` already scaled by 1/sqrt(d), `value`: (B, LK, d)) against
    entities (`query`: (E, LQ, d), `entity_global`: (E, d)), with the context LayerNorm `norm`. With `needed`, a
    (B, E) bool mask, only those pairs are computed; the other entries are 0. `block_mentions`: mentions per program
    (a program reads its entities' queries from memory once per block; the block's keys and values stay in cache).
    With `candidates` instead, (B, K) entity rows per mention (-1 for none), the scores (B, K) of those pairs alone
    (0 where -1): a program takes one mention and tiles of its candidates, whose token rows it gathers; no program
    runs for the -1 padding after a mention's last candidate (`candidate_programs`).
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
    eps = float(norm.eps)
    if candidates is not None:
        if needed is not None or candidates.dim() != 2 or candidates.shape[0] != num_mentions:
            raise ValueError(f"candidates must be ({num_mentions}, K) entity rows, without needed; got "
                             f"{tuple(candidates.shape)}")
        candidates = candidates.to(device=query.device, dtype=torch.int64).contiguous()
        out = torch.zeros(candidates.shape, dtype=torch.float32, device=query.device)
        constants, options = candidate_launch_parameters(lq, lk, d, dtype)
        items = candidate_programs(candidates, constants["BLOCK_E"] * CANDIDATE_STEPS)
        if items[0].numel():
            _g2l_candidates_kernel[(items[0].numel(),)](
                query, key, value, scaled_global, global_bias, candidates, *items, out, candidates.shape[1], eps,
                **constants, **options,
            )
        return out
    out = torch.zeros((num_mentions, num_entities), dtype=torch.float32, device=query.device)
    if needed is not None:
        if needed.shape != (num_mentions, num_entities):
            raise ValueError(f"needed must have shape {(num_mentions, num_entities)}, got {tuple(needed.shape)}")
        needed = needed.to(device=query.device, dtype=torch.int8).contiguous()
    constants, options = launch_parameters(lq, lk, d, dtype, needed is not None, block_mentions)
    grid = (triton.cdiv(num_entities, constants["BLOCK_E"]), triton.cdiv(num_mentions, block_mentions))
    _g2l_grid_kernel[grid](
        query, key, value, scaled_global, global_bias, needed if needed is not None else out, out,
        num_mentions, num_entities, eps, **constants, **options,
    )
    return out
