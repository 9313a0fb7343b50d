"""M3EL model: a shared CLIP encoder and the multi-level matching network that scores (mention, entity) pairs."""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_m3el import M3ELConfig
from .kernels_m3el import fused_g2l_wanted, try_fused_global_to_local

CSRA_MAX_TEMPERATURE = 99.0  # CSRA's convention, kept by the authors: this temperature means max pooling

# The parts of the final score that are dot products of vectors computed for each side alone, as (branch, name of
# the prepared vector, weight inside the branch): the G2G halves of the intra-modal branches (a branch scores
# (g2g + g2l) / 2) and the cross-modal scores. The final score averages the branches, so each weight is further
# divided by the number of branches. A model has those of its enabled branches (`prepare_*` outputs hold
# no others). The score bounds, the estimate and two-stage retrieval's vectors all read this one table.
DOT_PRODUCT_PARTS = (
    ("text", "embeds", 0.5),
    ("image", "embeds", 0.5),
    ("cross_modal", "text_to_image", 1.0),
    ("cross_modal", "image_to_text", 1.0),
)


@dataclass
class M3ELFeatures(ModelOutput):
    """
    Features of one side (mentions or entities), from the shared CLIP. Nothing here depends on the other side.

    Args:
        text_embeds (`torch.FloatTensor` of shape `(n, P)`):
            CLIP's projected, L2-normalised text vector `t`.
        text_tokens (`torch.FloatTensor` of shape `(n, L, Ht)`):
            CLIP's last text hidden states `T`, padding included.
        image_embeds (`torch.FloatTensor` of shape `(n, d)`):
            CLIP's projected, L2-normalised image vector mapped to the matching width, `v`.
        image_tokens (`torch.FloatTensor` of shape `(n, N, d)`):
            CLIP's last vision hidden states mapped to the matching width, `V`.
    """

    text_embeds: torch.FloatTensor | None = None
    text_tokens: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    image_tokens: torch.FloatTensor | None = None


@dataclass
class M3ELScores(ModelOutput):
    """
    Scores of every mention against every entity.

    Args:
        logits (`torch.FloatTensor` of shape `(B, E)`):
            Final score `S`, the mean of the branch scores in use.
        text_logits (`torch.FloatTensor` of shape `(B, E)`, *optional*):
            Textual intra-modal score (`None` when that branch is off).
        image_logits (`torch.FloatTensor` of shape `(B, E)`, *optional*):
            Visual intra-modal score (`None` when that branch is off).
        text_to_image_logits (`torch.FloatTensor` of shape `(B, E)`, *optional*):
            Textual-to-visual cross-modal score (`None` when the cross-modal branch is off).
        image_to_text_logits (`torch.FloatTensor` of shape `(B, E)`, *optional*):
            Visual-to-textual cross-modal score (only in `"bidirectional"` mode).
    """

    logits: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    text_to_image_logits: torch.FloatTensor | None = None
    image_to_text_logits: torch.FloatTensor | None = None


@dataclass
class M3ELOutput(ModelOutput):
    """
    Output of [`M3ELModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            the training objective on an aligned batch (entity `i` is the gold entity of mention `i`):
            cross-entropy of the final score, plus that of every branch score, plus the ICL loss.
        logits (`torch.FloatTensor` of shape `(B, E)`):
            Final score of every mention against every entity.
        text_logits, image_logits, text_to_image_logits, image_to_text_logits
            (`torch.FloatTensor` of shape `(B, E)`, *optional*): branch scores (`None` for branches not in use).
        icl_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Intra-modal contrastive loss, with `return_loss=True` and `config.use_icl`.
        mention_features ([`M3ELFeatures`]): features of the mentions.
        entity_features ([`M3ELFeatures`]): features of the entities.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    text_logits: torch.FloatTensor | None = None
    image_logits: torch.FloatTensor | None = None
    text_to_image_logits: torch.FloatTensor | None = None
    image_to_text_logits: torch.FloatTensor | None = None
    icl_loss: torch.FloatTensor | None = None
    mention_features: M3ELFeatures | None = None
    entity_features: M3ELFeatures | None = None


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Losses of half-precision runs are computed in float32; float64 stays float64."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def intra_modal_contrastive_loss(
    entity_embeds: torch.Tensor,
    mention_embeds: torch.Tensor,
    tau: float,
    inter_weight: float,
    intra_weight: float,
    all_entity_embeds: torch.Tensor | None = None,
    all_mention_embeds: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """
    Intra-modal contrastive learning (ICL) of one modality, on an aligned batch: row `i` of both inputs is a gold pair.

    Entity-anchored logits of row `i` are `[w_inter * e_i m^T, w_intra * e_i e^T] / tau`, the self-similarity
    multiplied by 0 (so it stays in the softmax, as in the authors' code); mention-anchored logits likewise.
    With negatives gathered from several processes, the local rows are anchors against `all_*` (the global batch),
    in which the local rows start at `offset`.
    """
    entity_embeds = F.normalize(_at_least_float32(entity_embeds), dim=-1)
    mention_embeds = F.normalize(_at_least_float32(mention_embeds), dim=-1)
    if all_entity_embeds is None:
        all_entities, all_mentions = entity_embeds, mention_embeds
    else:
        all_entities = F.normalize(_at_least_float32(all_entity_embeds), dim=-1)
        all_mentions = F.normalize(_at_least_float32(all_mention_embeds), dim=-1)
    n, total = entity_embeds.shape[0], all_entities.shape[0]
    labels = torch.arange(offset, offset + n, device=entity_embeds.device)
    off_diagonal = 1.0 - F.one_hot(labels, total).to(entity_embeds.dtype)  # (n, total): 0 at each row's self

    def anchored(anchor, others_of_other_side, others_of_same_side):
        inter = anchor @ others_of_other_side.T / tau  # (n, total)
        intra = anchor @ others_of_same_side.T / tau * off_diagonal  # (n, total), self zeroed, not masked
        return F.cross_entropy(torch.cat([inter_weight * inter, intra_weight * intra], dim=1), labels)

    return (anchored(entity_embeds, all_mentions, all_entities) + anchored(mention_embeds, all_entities, all_mentions)) / 2


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums every process's gradient of the gathered tensor and returns this
    process's slice, so each piece receives the gradient of every process's loss."""

    @staticmethod
    def forward(ctx, tensor):
        pieces = [torch.empty_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(pieces, tensor.contiguous())
        ctx.rank, ctx.rows = torch.distributed.get_rank(), tensor.shape[0]
        return torch.cat(pieces, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process in rank order, gradients flowing back to each process's piece."""
    return _GatherWithGrad.apply(tensor)


def _distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class M3ELIntraModalMatching(nn.Module):
    """Global-to-global plus global-to-local matching within one modality (intra-modal matching)."""

    def __init__(self, config: M3ELConfig, global_dim: int, token_dim: int):
        super().__init__()
        d = config.matching_dim
        self.query = nn.Linear(token_dim, d)
        self.key = nn.Linear(token_dim, d)
        self.value = nn.Linear(token_dim, d)
        self.global_proj = nn.Linear(global_dim, d)
        self.context_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.scale = 1.0 / math.sqrt(d)

    def entity_side(self, embeds: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the score needs from entities; depends on the entity alone, so a KB computes it once."""
        return {"embeds": embeds, "query": self.query(tokens), "global": self.global_proj(embeds)}

    def mention_side(self, embeds: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embeds": embeds, "key": self.key(tokens), "value": self.value(tokens)}

    def score(
        self, mention: dict[str, torch.Tensor], entity: dict[str, torch.Tensor], needed: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None, g2l: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        `(g2g + g2l) / 2`. Entity tensors of shape (E, ...) score every mention against every entity, (B, E);
        entity tensors gathered per mention, (B, K, ...), score each mention against its own K candidates, (B, K).
        `needed`, `candidates`: see `global_to_local`. `g2l`: the G2L scores of these pairs, already computed by
        `global_to_local` (of the output's shape), which are then not computed again.
        """
        global_to_global = _pair_dot(mention["embeds"], entity["embeds"], candidates)  # (B, E) or (B, K)
        if g2l is None:
            g2l = self.global_to_local(mention, entity, needed, candidates)
        return (global_to_global + g2l) / 2

    def global_to_local(
        self, mention: dict[str, torch.Tensor], entity: dict[str, torch.Tensor], needed: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        G2L scores: `<c_e, LN(mean_i softmax_j(Q_e K_b^T / sqrt(d)) U_b)>`, for every (mention, entity)
        pair (`entity["query"]` of shape (E, Lx, d) -> (B, E)) or for each mention's own candidates
        (`entity["query"]` of shape (B, K, Lx, d) -> (B, K)).

        Every pair of the grid goes through the fused kernel of `kernels_m3el.py` on CUDA (inference only), through
        plain PyTorch otherwise. `needed`, an optional (B, E) bool mask, says which pairs of the grid are wanted:
        the kernel skips the others, whose entries are then meaningless (the PyTorch path computes them anyway).
        `candidates`, optional (B, K) entity rows of the grid's entities (-1: none), gives each mention's scores
        against those entities alone, (B, K) (meaningless where -1): the kernel scores just those pairs, the PyTorch
        path the whole grid, then picks them.
        """
        query, value = entity["query"], mention["value"]
        if candidates is not None and query.dim() != 3:
            raise ValueError(
                "candidates are rows of ungathered (E, ...) entity tensors; these are gathered per mention"
            )
        # 1/sqrt(d) applied to the (B, Lx, d) keys rather than to the far larger attention scores: one pass fewer.
        key = mention["key"] * self.scale
        num_mentions, num_mention_tokens, d = key.shape
        if query.dim() == 3 and fused_g2l_wanted(query, key, value, entity["global"]):
            scores = try_fused_global_to_local(
                query, key, value, entity["global"], self.context_norm, needed, candidates=candidates
            )
            if scores is not None:
                return scores.to(torch.promote_types(query.dtype, torch.float32))
        if candidates is not None:
            return _listed(self.global_to_local(mention, entity), candidates)
        if query.dim() == 3:
            num_entities, num_entity_tokens, _ = query.shape
            # Every entity token attends over every mention token, in one matmul; no padding mask (as in the authors'
            # model).
            attention = query.reshape(-1, d) @ key.reshape(-1, d).T  # (E*Lx, B*Lx)
            attention = attention.view(num_entities, num_entity_tokens, num_mentions, num_mention_tokens)
            attention = attention.softmax(dim=-1)
            # mean_i (A U)[i] == (mean_i A) U: average the attention over entity tokens before touching the values.
            weights = attention.mean(dim=1).transpose(0, 1)  # (B, E, Lx)
            entity_global = entity["global"].unsqueeze(0)  # (1, E, d)
        else:
            _, num_candidates, num_entity_tokens, _ = query.shape
            # The tokens of a mention's K candidates attend over that mention's tokens only.
            attention = torch.bmm(query.reshape(num_mentions, -1, d), key.transpose(1, 2))  # (B, K*Lx, Lx)
            attention = attention.view(num_mentions, num_candidates, num_entity_tokens, num_mention_tokens)
            attention = attention.softmax(dim=-1)
            weights = attention.mean(dim=2)  # (B, K, Lx)
            entity_global = entity["global"]  # (B, K, d)
        # The weighted values, their LayerNorm and the dot in at least float32, as in the fused kernel: scores of a
        # half-precision index are float32 (only its tensors are half precision), and a context rounded to half
        # precision would leave the span of the mention's values, which `global_to_local_bounds` relies on (under
        # autocast the product is still half precision; the bounds allow for that).
        work = torch.promote_types(torch.promote_types(value.dtype, self.context_norm.weight.dtype), torch.float32)
        context = torch.bmm(weights.to(work), value.to(work)).to(work)  # (B, E, d) or (B, K, d)
        norm = self.context_norm
        context = F.layer_norm(context, norm.normalized_shape, norm.weight.to(work), norm.bias.to(work), norm.eps)
        return (context * entity_global.to(work)).sum(dim=-1)

    def mention_span(self, mention: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """
        What the mention-dependent G2L bound of `global_to_local_bounds` needs from B mentions, computed once per
        batch. Whatever the attention weights, a mention's centred context `x - mean(x) = sum_j a_j (U_j - mean(U_j))`
        lies in the span of its L centred value vectors: at most L of the d - 1 dimensions of centred vectors (at
        B/32 sizes 40 or 50 of 95). None when L >= d - 1 (the span can be all of them: nothing to gain).

        Returns `basis` (B, d, L): nearly orthonormal columns spanning the centred values (Cholesky QR, twice, in
        float64; Householder QR for a mention whose values are linearly dependent), kept in the bound's working
        dtype; `scale` (B,): `1 / sqrt(1 - |Q^T Q - I|)` of the basis as kept, so that `<w, y> / |y| <= |Q^T w| *
        scale` for y in its span; and `outside` (B,): how far a context as computed can lie from that span (the
        values' distance to it, and the rounding of the weighted sum and of the LayerNorm's centring, which leave
        it; the rounding of the weights does not).
        """
        value = mention["value"]
        num_mentions, tokens, d = value.shape
        if tokens >= d - 1:
            return None
        work = torch.promote_types(value.dtype, torch.float32)
        exact = value.to(device="cpu" if value.device.type == "mps" else value.device, dtype=torch.float64)
        centered = exact - exact.mean(dim=-1, keepdim=True)  # (B, L, d)
        rows, failed = centered, torch.zeros(num_mentions, dtype=torch.bool, device=centered.device)
        for _ in range(2):  # rows <- L^-1 rows with L L^T = rows rows^T: orthonormal rows (the second pass refines)
            lower, info = torch.linalg.cholesky_ex(rows @ rows.transpose(1, 2))
            failed |= info != 0
            lower = torch.where(failed[:, None, None], torch.eye(tokens, dtype=lower.dtype, device=lower.device), lower)
            rows = torch.linalg.solve_triangular(lower, rows, upper=False)
        basis = rows.transpose(1, 2)  # (B, d, L)
        if failed.any():
            basis[failed] = torch.linalg.qr(centered[failed].transpose(1, 2)).Q
        basis = basis.to(work)
        kept = basis.to(torch.float64)
        # Checked on the basis as kept: its distance from orthonormality, and each value's distance to its span
        # (at most the distance to the point Q Q^T u of the span).
        gram = kept.transpose(1, 2) @ kept - torch.eye(tokens, dtype=torch.float64, device=kept.device)
        deviation = torch.linalg.matrix_norm(gram).clamp(max=0.5)  # Frobenius >= spectral; 0.5: no use, see below
        scale = torch.where(deviation < 0.5, 1 / torch.sqrt(1 - deviation), torch.inf)
        residual = (centered - (centered @ kept) @ kept.transpose(1, 2)).norm(dim=-1)  # (B, L)
        largest = exact.norm(dim=-1).amax(dim=1)  # (B,): |x| <= max_j |U_j| for the weighted sum x
        # Rounding of the context off the span: each entry of x = sum_j a_j U_j computed from rounded inputs (the
        # fused kernel's TF32x3 products, or torch's float32 matmul precision) with float32 accumulation over L
        # terms, then the centring's subtraction; half precision under autocast rounds the product's output too.
        unit = torch.finfo(work).eps / 2
        inputs = max(_product_rounding(work, value.device), 2.0**-21 if work == torch.float32 else unit)
        rounding = 2 * (inputs + _output_rounding(value.device) + (tokens + 2) * unit)
        # (times the weights' sum, 1 up to their rounding: at most 1.05 even for half-precision weights)
        outside = 1.05 * (residual.amax(dim=1) + (1e-12 + rounding) * largest)
        to = {"device": value.device, "dtype": work}
        return {"basis": basis.to(value.device), "scale": scale.to(**to), "outside": outside.to(**to)}

    def global_to_local_center(self, entity: dict[str, torch.Tensor]) -> torch.Tensor:
        """`<c, beta>` (E,): the centre of `global_to_local_bounds`'s interval, the G2L part for a context orthogonal to
        the entity's vector; in float32 (float64 for a float64 index)."""
        dtype = torch.promote_types(entity["global"].dtype, torch.float32)  # float64 stays float64
        return entity["global"].to(dtype) @ self.context_norm.bias.to(dtype)

    def global_to_local_bounds(
        self, entity: dict[str, torch.Tensor], span: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        `(center, radius)` in float32 (float64 for a float64 index), such that `g2l[b, e]` lies in
        `center[e] +- radius[b, e]`: `center` (E,), `radius` (E,) for every mention, or (B, E) for the B mentions of
        `span` (`mention_span`), tighter.

        The context is `LN(x) = gamma * n + beta` with `n = (x - mean(x)) / sqrt(var(x) + eps)`, whose entries sum to
        0 and whose norm is below sqrt(d); so `<c, LN(x)> = <c, beta> + <w, n>` with `w = c * gamma - mean(c *
        gamma)`, and Cauchy-Schwarz bounds the second term by `sqrt(d) |w|` whatever x is (a context along w attains
        it). With a mention's span: n is along the centred context, which lies in the span of the mention's centred
        values, so `|<w, n>| <= sqrt(d) |P w|`, P the projection onto that span; a context `outside` the span by t
        moves `<w, n>` by at most `2 |w| t / sqrt(eps)` (the gradient of `<w, n>` in x is at most `2 |w| / sqrt(eps)`
        long). The smaller of the two bounds is taken.
        """
        dtype = torch.promote_types(entity["global"].dtype, torch.float32)  # float64 stays float64
        entity_global = entity["global"].to(dtype)
        scaled = entity_global * self.context_norm.weight.to(dtype)
        scaled = scaled - scaled.mean(dim=-1, keepdim=True)  # w, (E, d)
        size = scaled.norm(dim=-1)  # |w|
        d = entity_global.shape[-1]
        center, radius = self.global_to_local_center(entity), size * math.sqrt(d)
        if span is None:  # (also the mention_span of a block with as many tokens as channels)
            return center, radius
        basis = span["basis"].to(dtype)  # (B, d, r)
        num_mentions, _, rank = basis.shape
        # |Q^T w| for every (mention, entity) pair, in one product (E, d) x (d, B * r)
        coordinates = scaled @ basis.transpose(0, 1).reshape(d, num_mentions * rank)
        projected = torch.linalg.vector_norm(coordinates.view(-1, num_mentions, rank), dim=-1).T  # (B, E)
        # that product's rounding bounds the error of |Q^T w| by |w| * this
        unit = torch.finfo(dtype).eps / 2
        error = math.sqrt(rank) * ((d + 2) * unit + 2 * _product_rounding(dtype, basis.device))
        scale = span["scale"].to(dtype)  # inf: a basis too far from orthonormal to use (then the radius for all)
        usable = torch.isfinite(scale)
        within = (projected + error * size[None, :]) * (math.sqrt(d) * torch.where(usable, scale, 1.0)[:, None])
        off_span = (2 / math.sqrt(self.context_norm.eps)) * span["outside"].to(dtype)[:, None] * size[None, :]
        # (the norm's and these sums' own rounding: a relative 2 (r + 8) units)
        tighter = within.add_(off_span).mul_(1 + 2 * (rank + 8) * unit)
        return center, torch.where(usable[:, None], torch.minimum(tighter, radius[None, :]), radius[None, :])


# Relative rounding of a float32 matmul's inputs by torch's float32 matmul setting: the global one
# (`torch.set_float32_matmul_precision`) or a backend's own (`torch.backends.cuda.matmul.fp32_precision`,
# `torch.backends.mkldnn.matmul.fp32_precision`, or all at once through `torch.backends.fp32_precision`).
_FLOAT32_INPUT_ROUNDING = {"highest": 0.0, "ieee": 0.0, "high": 2.0**-11, "tf32": 2.0**-11, "medium": 2.0**-8,
                           "bf16": 2.0**-8}


def _float32_matmul_setting(device: torch.device) -> str | None:
    """How torch may multiply float32 matrices on `device`: its backend's own setting where torch has one and it is
    set ("ieee", "tf32", "bf16"), else the global one ("highest", "high", "medium"); None when torch will not say
    (it refuses to report the global setting once the legacy and the per-backend settings were both used)."""
    backend = {"cuda": ("cuda", "matmul"), "cpu": ("mkldnn", "matmul")}.get(device.type)
    setting = None
    if backend is not None:  # torch >= 2.9
        module = getattr(getattr(torch.backends, backend[0], None), backend[1], None)
        setting = getattr(module, "fp32_precision", None)
    if setting in (None, "none"):
        try:
            setting = torch.get_float32_matmul_precision()
        except RuntimeError:
            setting = None
    return setting


def _product_rounding(dtype: torch.dtype, device: torch.device) -> float:
    """
    A bound on the relative rounding of the inputs of a torch matmul in `dtype` on `device`: none for float64 and,
    by default, for float32; when torch's float32 matmul setting allows TF32 (`torch.set_float32_matmul_precision(
    "high")`, or `fp32_precision = "tf32"`) TF32 inputs, when it allows bfloat16 ("medium", "bf16") bfloat16 ones, and
    the same when the setting cannot be read; under autocast to half precision, half-precision inputs.
    """
    if _output_rounding(device):
        return 2.0**-8
    if dtype != torch.float32:
        return 0.0
    return _FLOAT32_INPUT_ROUNDING.get(_float32_matmul_setting(device), 2.0**-8)


def _output_rounding(device: torch.device) -> float:
    """Relative rounding of a matmul's output under autocast to half precision on `device` (0 outside autocast)."""
    device_type = device.type if device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"
    return 2.0**-8 if torch.is_autocast_enabled(device_type) else 0.0


def _listed(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Grid scores (B, E) at each mention's listed entity rows (B, K); -1 (none) gives a meaningless entry."""
    return scores.gather(1, candidates.clamp(min=0))


def _pair_dot(mention: torch.Tensor, entity: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """
    Dot products of mention vectors (B, D) with entity vectors: (E, D) -> every pair, (B, E); entity vectors
    gathered per mention, (B, K, D) -> each mention with its own K candidates, (B, K); (E, D) with `candidates`,
    (B, K) rows of them (-1: none, a meaningless entry) -> (B, K), by gathering the K rows when that is less work
    than every pair (K * D < E), else every pair, then picked. In at least float32: a half-precision index keeps
    its vectors in half precision, not its scores (under autocast the product is still half precision).
    """
    if candidates is not None:
        rows = candidates.clamp(min=0)
        if rows.shape[1] * entity.shape[1] < entity.shape[0]:
            return _pair_dot(mention, entity.index_select(0, rows.reshape(-1)).view(*rows.shape, -1))
        return _pair_dot(mention, entity).gather(1, rows)
    mention, entity = _at_least_float32(mention), _at_least_float32(entity)
    if entity.dim() == 2:
        return mention @ entity.T
    return torch.bmm(entity, mention.unsqueeze(-1)).squeeze(-1)


class M3ELMatch(nn.Module):
    """Attention of `p`'s tokens over `q`'s tokens; the same linear map keys `q` and transforms the result."""

    def __init__(self, config: M3ELConfig):
        super().__init__()
        self.proj = nn.Linear(config.matching_dim, config.matching_dim)

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        attention = torch.bmm(p, self.proj(q).transpose(1, 2)).softmax(dim=-1)  # (n, Lp, Lq), no 1/sqrt(d)
        return F.relu(self.proj(torch.bmm(attention, q)))  # (n, Lp, d)


class M3ELMultiHeadPooling(nn.Module):
    """Mean over heads of CSRA pooling over tokens: `mean_k X + lambda * attention_T(X)` per channel."""

    def __init__(self, config: M3ELConfig):
        super().__init__()
        self.temperatures = tuple(config.csra_temperatures)
        self.lam = config.csra_lambda

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (n, K, d) -> (n, d)
        base = tokens.mean(dim=1)
        pooled = 0.0
        for temperature in self.temperatures:
            if temperature == CSRA_MAX_TEMPERATURE:
                attended = tokens.max(dim=1).values
            else:
                attended = (tokens * (tokens * temperature).softmax(dim=1)).sum(dim=1)
            pooled = pooled + base + self.lam * attended
        return pooled / len(self.temperatures)


class M3ELCrossModalMatching(nn.Module):
    """
    Cross-modal matching. Each side's vectors depend on that side alone; the scores are dot products.

    `text_to_image` mode: textual-to-visual only, its two attended views fused by a learned gate.
    `bidirectional` mode: textual-to-visual and visual-to-textual through one shared block, without fusion.
    """

    def __init__(self, config: M3ELConfig):
        super().__init__()
        d = config.matching_dim
        self.bidirectional = config.cross_modal == "bidirectional"
        self.text_proj = nn.Linear(config.clip_config.projection_dim, d)
        self.image_proj = nn.Linear(d, d)
        self.gate = nn.Linear(d, 1)
        self.gate_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.match = M3ELMatch(config)
        self.pooling = M3ELMultiHeadPooling(config)
        if not self.bidirectional:
            self.fusion = nn.Linear(d, d)

    def _gated(self, anchor: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.gate_norm(anchor * torch.tanh(self.gate(anchor)) + context)

    def _attend(self, anchor: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Anchor vector (n, d) against tokens (n, K, d): both attended views pooled into one context (n, d)."""
        attended_anchor = self.match(anchor.unsqueeze(1), tokens)  # (n, 1, d)
        attended_tokens = self.match(tokens, anchor.unsqueeze(1))  # (n, K, d)
        if self.bidirectional:
            return self.pooling(torch.cat([attended_anchor, attended_tokens], dim=1))
        attended_anchor = attended_anchor.squeeze(1)
        pooled = self.pooling(attended_tokens)
        gate = torch.sigmoid(self.fusion(pooled) + self.fusion(attended_anchor))
        return attended_anchor * gate + pooled * (1 - gate)

    def forward(self, features: M3ELFeatures) -> dict[str, torch.Tensor]:
        """Per-side vectors `text_to_image` (n, d) and, in bidirectional mode, `image_to_text` (n, d)."""
        text = self.text_proj(features.text_embeds)  # (n, d)
        image_tokens = self.image_proj(features.image_tokens)  # (n, N, d)
        vectors = {"text_to_image": self._gated(text, self._attend(text, image_tokens))}
        if self.bidirectional:
            image = self.image_proj(features.image_embeds)  # (n, d)
            text_tokens = self.text_proj(features.text_tokens)  # (n, L, d), needs Ht == P
            vectors["image_to_text"] = self._gated(image, self._attend(image, text_tokens))
        return vectors


class M3ELPreTrainedModel(PreTrainedModel):
    config_class = M3ELConfig
    config: M3ELConfig
    base_model_prefix = "m3el"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPTextEmbeddings", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            # PyTorch's default initialisation, which the authors' matching network trained from.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        else:
            super()._init_weights(module)


class M3ELModel(M3ELPreTrainedModel):
    """
    M3EL: encodes mentions and entities with one shared CLIP (`encode`), scores every mention against every
    entity from the features of both sides (`score`), and trains on aligned batches (`forward(return_loss=True)`).
    """

    def __init__(self, config: M3ELConfig):
        super().__init__(config)
        clip_config = config.clip_config
        d = config.matching_dim
        projection_dim = clip_config.projection_dim
        text_dim = clip_config.text_config.hidden_size
        vision_dim = clip_config.vision_config.hidden_size

        self.clip = CLIPModel._from_config(clip_config)
        # CLIP's contrastive temperature plays no part in M3EL's scores or loss.
        self.clip.logit_scale.requires_grad_(False)
        self.image_embeds_proj = nn.Linear(projection_dim, d)  # Wvc: P -> d
        self.image_tokens_proj = nn.Linear(vision_dim, d)  # Wvt: Hv -> d
        self.text_embeds_norm = nn.LayerNorm(projection_dim, eps=config.layer_norm_eps)
        self.text_tokens_norm = nn.LayerNorm(text_dim, eps=config.layer_norm_eps)
        self.image_embeds_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.image_tokens_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        # Branches that are switched off (ablations) are not built at all.
        self.text_matching = (
            M3ELIntraModalMatching(config, projection_dim, text_dim) if config.use_text_matching else None
        )
        self.image_matching = M3ELIntraModalMatching(config, d, d) if config.use_image_matching else None
        self.cross_modal_matching = M3ELCrossModalMatching(config) if config.use_cross_modal_matching else None
        self.post_init()

    @classmethod
    def from_clip(cls, pretrained_model_name_or_path, **config_overrides) -> "M3ELModel":
        """
        A fresh M3EL whose backbone is a pretrained `CLIPModel` (the published recipe starts from
        `openai/clip-vit-base-patch32`) and whose matching network is newly initialised.
        `config_overrides` are [`M3ELConfig`] fields, e.g. `cross_modal="bidirectional"`.
        """
        clip = CLIPModel.from_pretrained(pretrained_model_name_or_path, dtype=torch.float32)
        config = M3ELConfig(clip_config=clip.config.to_dict(), **config_overrides)
        model = cls(config)
        model.clip.load_state_dict(clip.state_dict())
        model.clip.logit_scale.requires_grad_(False)
        return model

    # ---------------------------------------------------------------------------------------------- features

    def _check_inputs(self, input_ids, attention_mask, pixel_values, side: str):
        prefix = "" if side == "mention" else "entity_"
        count = "num_mentions" if side == "mention" else "num_entities"
        length = self.config.text_max_length
        if input_ids is None or pixel_values is None:
            plural = "mentions" if side == "mention" else "entities"
            hint = ("processor(mentions=..., sentences=..., images=...)" if side == "mention" else
                    "processor(entity_names=..., entity_descriptions=..., entity_images=...)")
            raise ValueError(f"{plural} need both `{prefix}input_ids` and `{prefix}pixel_values` (from {hint}); "
                             "model(...) scores mentions against entities and needs both sides, model.encode(...) "
                             "encodes one side")
        if input_ids.dim() != 2 or input_ids.shape[1] != length:
            raise ValueError(
                f"`{prefix}input_ids` must have shape ({count}, {length}): texts are padded to exactly "
                f"config.text_max_length={length} tokens (M3ELProcessor does this); got {tuple(input_ids.shape)}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`{prefix}attention_mask` has shape {tuple(attention_mask.shape)}, "
                f"but `{prefix}input_ids` has {tuple(input_ids.shape)}"
            )
        vision = self.config.clip_config.vision_config
        expected = (vision.num_channels, vision.image_size, vision.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"`{prefix}pixel_values` must have shape ({count}, {', '.join(map(str, expected))}); "
                f"got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{pixel_values.shape[0]} images for {input_ids.shape[0]} texts in the {side} batch: "
                "every text needs exactly one image (an all-zero one when it has none)"
            )

    def encode(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        side: str = "mention",
    ) -> M3ELFeatures:
        """
        One CLIP pass over texts and images of one side (mentions and entities share everything).

        Args:
            input_ids (`torch.LongTensor` of shape `(n, L)`): texts padded to `config.text_max_length`.
            attention_mask (`torch.LongTensor` of shape `(n, L)`, *optional*): CLIP's text attention mask.
            pixel_values (`torch.FloatTensor` of shape `(n, 3, H, W)`): CLIP-normalised images (zeros: no image).
            has_image (`torch.BoolTensor` of shape `(n,)`, *optional*): the processor's record of readable images;
                informational (a sample without one is encoded with the all-zero image, as in training), accepted
                so that `encode(**processor_output)` works.
            side (`str`): `"mention"` or `"entity"`, only used in error messages.
        """
        self._check_inputs(input_ids, attention_mask, pixel_values, side)
        pixel_values = pixel_values.to(self.clip.visual_projection.weight.dtype)
        text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        vision = self.clip.get_image_features(pixel_values=pixel_values)
        text_embeds = F.normalize(text.pooler_output, dim=-1, eps=0.0)  # (n, P)
        image_embeds = F.normalize(vision.pooler_output, dim=-1, eps=0.0)  # (n, P)
        return M3ELFeatures(
            text_embeds=text_embeds,
            text_tokens=text.last_hidden_state,  # (n, L, Ht)
            image_embeds=self.image_embeds_proj(image_embeds),  # (n, d)
            image_tokens=self.image_tokens_proj(vision.last_hidden_state),  # (n, N, d)
        )

    # ----------------------------------------------------------------------------------------------- scoring

    def _normalized(self, features: M3ELFeatures) -> M3ELFeatures:
        """The four LayerNorms of the matching network, shared by mentions and entities."""
        return M3ELFeatures(
            text_embeds=self.text_embeds_norm(features.text_embeds),
            text_tokens=self.text_tokens_norm(features.text_tokens),
            image_embeds=self.image_embeds_norm(features.image_embeds),
            image_tokens=self.image_tokens_norm(features.image_tokens),
        )

    def prepare_entities(self, features: M3ELFeatures) -> dict[str, dict[str, torch.Tensor]]:
        """
        Everything the score needs from entities, all of it depending on the entity alone: a KB computes this once
        and scores it against any number of mention batches with `score_prepared`.
        """
        return self._prepare(features, side="entity")

    def prepare_mentions(self, features: M3ELFeatures) -> dict[str, dict[str, torch.Tensor]]:
        """Everything the score needs from mentions (see `prepare_entities`)."""
        return self._prepare(features, side="mention")

    def _prepare(self, features: M3ELFeatures, side: str) -> dict[str, dict[str, torch.Tensor]]:
        normed = self._normalized(features)
        prepared = {}
        for name, block, embeds, tokens in (
            ("text", self.text_matching, normed.text_embeds, normed.text_tokens),
            ("image", self.image_matching, normed.image_embeds, normed.image_tokens),
        ):
            if block is not None:
                prepared[name] = (block.entity_side if side == "entity" else block.mention_side)(embeds, tokens)
        if self.cross_modal_matching is not None:
            prepared["cross_modal"] = self.cross_modal_matching(normed)
        return prepared

    def score_prepared(
        self, mentions: dict, entities: dict, needed: torch.Tensor | None = None, candidates: torch.Tensor | None = None,
        g2l: dict[str, torch.Tensor] | None = None,
    ) -> M3ELScores:
        """
        Scores (B, E) from the outputs of `prepare_mentions` and `prepare_entities`. Entity tensors gathered per
        mention, of shape (B, K, ...), give each mention's scores against its own candidates, (B, K) (see
        `score_prepared_candidates`). `needed`, an optional (B, E) bool mask of the pairs wanted, lets the fused G2L
        kernel skip the others (their scores are then meaningless; see `M3ELIntraModalMatching.global_to_local`).
        `candidates`, optional (B, K) rows of the (E, ...) entity tensors (-1: none), gives the scores (B, K) of
        those pairs alone (meaningless where -1), the entity tensors left ungathered. `g2l`, optional, maps "text"
        or "image" to that block's G2L scores of these pairs, already computed (`global_to_local`, of the output's
        shape): they are used as they are, and only the other parts are computed.
        """
        g2l = g2l or {}
        branch_logits = {}
        if self.text_matching is not None:
            branch_logits["text"] = self.text_matching.score(
                mentions["text"], entities["text"], needed, candidates, g2l.get("text")
            )
        if self.image_matching is not None:
            branch_logits["image"] = self.image_matching.score(
                mentions["image"], entities["image"], needed, candidates, g2l.get("image")
            )
        if self.cross_modal_matching is not None:
            for name, vector in mentions["cross_modal"].items():
                branch_logits[name] = _pair_dot(vector, entities["cross_modal"][name], candidates)
        logits = sum(branch_logits.values()) / len(branch_logits)
        return M3ELScores(
            logits=logits,
            text_logits=branch_logits.get("text"),
            image_logits=branch_logits.get("image"),
            text_to_image_logits=branch_logits.get("text_to_image"),
            image_to_text_logits=branch_logits.get("image_to_text"),
        )

    def mention_spans(self, mentions: dict) -> dict[str, dict[str, torch.Tensor]]:
        """`M3ELIntraModalMatching.mention_span` of each intra-modal block, for `score_bounds` (once per batch)."""
        return {
            name: block.mention_span(mentions[name])
            for name, block in (("text", self.text_matching), ("image", self.image_matching))
            if block is not None
        }

    def score_bounds(
        self, mentions: dict, entities: dict, spans: dict | None = None, parts: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Lower and upper bounds (B, E), float32 (float64 for a float64 index), of the final scores
        `score_prepared(mentions, entities).logits`, at the cost of dot products of vectors: the parts of the score
        that are dot products (G2G, cross-modal) exactly, each G2L part within the interval of
        `global_to_local_bounds` for these mentions (`spans`: `mention_spans(mentions)`, computed here if not given;
        pass it when bounding one batch against many entity chunks). The bounds include a margin for the rounding
        of either computation in the entity tensors' dtype, so an entity whose upper bound is below a mention's
        score threshold cannot reach it when scored exactly (the exact ranker skips it).

        `parts`, a dict, receives each G2L block's `(center, radius)` by name and the number of branches under
        "branches": a block's G2L part enters both bounds as `(center -+ radius) / (2 * branches)`, so once it is
        known exactly (g), the bounds narrow by adding `(g - center +- radius) / (2 * branches)`.
        """
        center, radius, g2l_size = 0.0, 0.0, 0.0
        dense, magnitude, num_branches = self._dot_product_parts(mentions, entities, sizes=True)
        work = dense.dtype
        if spans is None:
            spans = self.mention_spans(mentions)
        for name, block in self._intra_modal_blocks():
            block_center, block_radius = block.global_to_local_bounds(entities[name], spans[name])
            center, radius = center + block_center / 2, radius + block_radius / 2
            if parts is not None:
                parts[name] = (block_center, block_radius)
            # the rounding of the exact G2L score scales with its terms, within the mention-independent radius
            g2l_size = g2l_size + (block_center.abs() + block.global_to_local_bounds(entities[name])[1]) / 2
        # Relative margin for rounding: generous next to float32's accumulated error over the widths here (<= 1e-5);
        # the scores of a half-precision index are computed in float32 from its half-precision tensors, so the same
        # margin holds, unless torch's float32 products round their inputs (TF32, bfloat16) or autocast is on.
        device = next(iter(next(iter(entities.values())).values())).device
        relative = 1e-12 if work == torch.float64 else max(1e-4, 8 * _product_rounding(work, device))
        if torch.is_tensor(center):
            magnitude.add_(g2l_size[None, :])
            dense.add_(center[None, :])
        margin = magnitude.mul_(relative)
        margin = margin.add_(radius) if torch.is_tensor(radius) else margin  # radius: (B, E)
        lower = (dense - margin).div_(num_branches)
        upper = dense.add_(margin).div_(num_branches)
        if parts is not None:
            parts["branches"] = num_branches
        return lower, upper

    def _intra_modal_blocks(self):
        return [(name, block) for name, block in (("text", self.text_matching), ("image", self.image_matching))
                if block is not None]

    def _dot_product_parts(self, mentions: dict, entities: dict, sizes: bool = False):
        """
        The parts of the final score that are dot products of vectors computed for each side alone (G2G text and
        image, each half of its branch; the cross-modal scores), summed with their weights, not yet divided by the
        number of branches: (sum (B, E) in float32, or float64 for a float64 index; with `sizes`, the sum of `|m| |e|`
        times the weights (B, E), which bounds each product's rounding, else None; the number of branches).
        """
        dense, magnitude, num_branches = None, None, 0
        dtype = next(iter(next(iter(entities.values())).values())).dtype
        work = torch.promote_types(dtype, torch.float32)
        pairs = [(mentions[branch][name], entities[branch][name], weight)
                 for branch, name, weight in DOT_PRODUCT_PARTS if name in mentions.get(branch, {})]
        for mention_vectors, entity_vectors, weight in pairs:
            num_branches += 1
            mention_vectors, entity_vectors = mention_vectors.to(work), entity_vectors.to(work)
            product = (mention_vectors @ entity_vectors.T) * weight
            dense = product if dense is None else dense.add_(product)
            if sizes:  # |<m, e>| <= |m| |e| bounds the size of every term of the dot product, hence of its rounding
                size = mention_vectors.norm(dim=-1)[:, None] * entity_vectors.norm(dim=-1)[None, :] * weight
                magnitude = size if magnitude is None else magnitude.add_(size)
        return dense, magnitude, num_branches

    def score_estimate(self, mentions: dict, entities: dict) -> torch.Tensor:
        """
        A cheap estimate (B, E) of the final scores `score_prepared(mentions, entities).logits`, float32 (float64
        for a float64 index): the parts that are dot products exactly, and each G2L part at the centre of its
        interval (`global_to_local_bounds`: its value for a context orthogonal to the entity's vector), so the middle
        of `score_bounds`. Dot products of vectors only, no attention: `EntityIndex.topk` picks by it the entities
        it scores first, and the candidates it re-scores exactly when asked for `candidates`.
        """
        dense, _, num_branches = self._dot_product_parts(mentions, entities)
        for name, block in self._intra_modal_blocks():
            dense.add_(block.global_to_local_center(entities[name])[None, :] / 2)
        return dense.div_(num_branches)

    def score_prepared_candidates(self, mentions: dict, candidates: dict) -> M3ELScores:
        """
        Each mention against its own K candidate entities: `candidates` holds `prepare_entities` outputs gathered
        per mention, every tensor of shape (B, K, ...) (e.g. `tensor[rows]` with rows (B, K)). Entry [b, k] of the
        scores (B, K) equals the entry of `score_prepared` for mention b and the entity in slot k.
        """
        num_mentions = next(iter(next(iter(mentions.values())).values())).shape[0]
        shapes = {f"{branch}.{name}": tuple(t.shape) for branch, part in candidates.items() for name, t in part.items()}
        leading = {shape[:2] for shape in shapes.values()}
        if any(len(shape) < 3 for shape in shapes.values()) or len(leading) != 1 or leading.pop()[0] != num_mentions:
            raise ValueError(
                f"candidates must be entity tensors gathered per mention, all of shape ({num_mentions}, K, ...); "
                f"got {shapes}"
            )
        return self.score_prepared(mentions, candidates)

    def score(
        self, mention_features: M3ELFeatures, entity_features: M3ELFeatures, entity_chunk_size: int | None = None
    ) -> M3ELScores:
        """
        Score every mention against every entity from features made by `encode`. Entities are scored
        `entity_chunk_size` at a time when given, which bounds memory for large KBs without changing the result.
        """
        _check_features(mention_features, "mention_features")
        _check_features(entity_features, "entity_features")
        mentions = self.prepare_mentions(mention_features)
        num_entities = entity_features.text_embeds.shape[0]
        if entity_chunk_size is not None and entity_chunk_size <= 0:
            raise ValueError(f"entity_chunk_size must be positive, got {entity_chunk_size}")
        chunk = entity_chunk_size or max(num_entities, 1)
        pieces = [
            self.score_prepared(mentions, self.prepare_entities(_slice_features(entity_features, start, start + chunk)))
            for start in range(0, num_entities, chunk)
        ]
        if len(pieces) == 1:
            return pieces[0]
        return M3ELScores(**{key: torch.cat([p[key] for p in pieces], dim=1) for key in pieces[0].keys()})

    # ----------------------------------------------------------------------------------------------- forward

    def icl_loss(
        self,
        mention_features: M3ELFeatures,
        entity_features: M3ELFeatures,
        all_mention_features: M3ELFeatures | None = None,
        all_entity_features: M3ELFeatures | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """
        Intra-modal contrastive learning (ICL) on the raw text and image vectors (before any LayerNorm), averaged over
        the two modalities.
        `all_*` and `offset`: the global batch when negatives are gathered from several processes.
        """
        args = (self.config.icl_tau, self.config.icl_inter_weight, self.config.icl_intra_weight)
        losses = []
        for name in ("text_embeds", "image_embeds"):
            losses.append(
                intra_modal_contrastive_loss(
                    entity_features[name],
                    mention_features[name],
                    *args,
                    all_entity_embeds=None if all_entity_features is None else all_entity_features[name],
                    all_mention_embeds=None if all_mention_features is None else all_mention_features[name],
                    offset=offset,
                )
            )
        return (losses[0] + losses[1]) / 2

    def loss(self, scores: M3ELScores, icl_loss: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
        """
        The training loss on an aligned batch (the gold entity of mention `i` is entity `offset + i`, every other entity
        is an in-batch negative): CE of the final score plus CE of every branch score plus ICL, each with weight 1.
        """
        labels = torch.arange(offset, offset + scores.logits.shape[0], device=scores.logits.device)
        loss = sum(F.cross_entropy(_at_least_float32(logits), labels) for logits in scores.values())
        return loss + icl_loss if icl_loss is not None else loss

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        entity_input_ids: torch.LongTensor | None = None,
        entity_attention_mask: torch.LongTensor | None = None,
        entity_pixel_values: torch.FloatTensor | None = None,
        return_loss: bool = False,
        gather_negatives: bool = False,
        has_image: torch.BoolTensor | None = None,
        entity_has_image: torch.BoolTensor | None = None,
    ) -> M3ELOutput:
        r"""
        Encode a batch of mentions and a batch of entities and score every mention against every entity.

        Args:
            input_ids, attention_mask, pixel_values: mention inputs from [`M3ELProcessor`], `(B, L)` and `(B, 3, H, W)`.
            entity_input_ids, entity_attention_mask, entity_pixel_values: entity inputs, `(E, L)` and `(E, 3, H, W)`.
            return_loss (`bool`): compute the training objective; needs an aligned batch (`E == B`, entity `i` is
                the gold entity of mention `i`).
            gather_negatives (`bool`): in distributed training, score the local mentions against the entities of
                every process and take the ICL negatives from every process too (gradients flow back through the
                gather), so that N processes of batch b train like one process of batch N*b. Every process must
                hold the same number of mentions. Without an initialised process group it changes nothing.
                `logits` are then (b, N*b).
            has_image, entity_has_image (`torch.BoolTensor`, *optional*): the processor's record of which samples
                had a readable image. Informational: a sample without one is scored with the all-zero image, as
                the published model was trained.
        """
        mention_features = self.encode(input_ids, attention_mask, pixel_values, side="mention")
        entity_features = self.encode(entity_input_ids, entity_attention_mask, entity_pixel_values, side="entity")
        if return_loss and entity_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"return_loss=True needs an aligned batch (entity i is the gold entity of mention i), but got "
                f"{input_ids.shape[0]} mentions and {entity_input_ids.shape[0]} entities"
            )
        rank, world_size = _distributed_world() if gather_negatives else (0, 1)
        all_mention_features = all_entity_features = None
        offset = 0
        if world_size > 1:
            all_mention_features = M3ELFeatures(**{k: gather_with_grad(v) for k, v in mention_features.items()})
            all_entity_features = M3ELFeatures(**{k: gather_with_grad(v) for k, v in entity_features.items()})
            if all_mention_features.text_embeds.shape[0] != world_size * input_ids.shape[0]:
                raise ValueError("gather_negatives needs the same number of mentions on every process")
            offset = rank * input_ids.shape[0]
        scores = self.score(mention_features, entity_features if all_entity_features is None else all_entity_features)
        icl_loss = loss = None
        if return_loss:
            if self.config.use_icl:
                icl_loss = self.icl_loss(
                    mention_features, entity_features, all_mention_features, all_entity_features, offset
                )
            loss = self.loss(scores, icl_loss, offset)
        return M3ELOutput(
            loss=loss,
            logits=scores.logits,
            text_logits=scores.text_logits,
            image_logits=scores.image_logits,
            text_to_image_logits=scores.text_to_image_logits,
            image_to_text_logits=scores.image_to_text_logits,
            icl_loss=icl_loss,
            mention_features=mention_features,
            entity_features=entity_features,
        )


def _check_features(features: M3ELFeatures, name: str):
    if not isinstance(features, M3ELFeatures):
        raise TypeError(f"{name} must be an M3ELFeatures (from M3ELModel.encode), got {type(features).__name__}")
    counts = {key: value.shape[0] for key, value in features.items()}
    if len(counts) != 4 or len(set(counts.values())) != 1:
        raise ValueError(f"{name} must hold all four features for the same number of samples, got {counts}")


def _slice_features(features: M3ELFeatures, start: int, stop: int) -> M3ELFeatures:
    return M3ELFeatures(**{key: value[start:stop] for key, value in features.items()})


__all__ = ["M3ELFeatures", "M3ELModel", "M3ELOutput", "M3ELPreTrainedModel", "M3ELScores"]
