"""An independent float64 computation of M3EL written from /work/shared/SPEC.md alone, for tests to compare against.

Nothing here calls the model's code: only transformers' `CLIPModel` (the backbone, SPEC section 2) is reused; every
step after the CLIP pass is plain float64 tensor arithmetic following the SPEC formulas, with loops where clearer.
The G2L attention is built in full, `(E, B, Lx, Lx)`, and `mean_i (A U)[i]` is computed literally (no
`(mean_i A) U` shortcut), so a shortcut in the model is checked rather than repeated.
"""

import copy
import math

import torch
from transformers import CLIPModel

CSRA_MAX_TEMPERATURE = 99.0  # SPEC 4.2: the head with T = 99 takes the max over tokens instead of the softmax term

FEATURE_NAMES = ("text_embeds", "text_tokens", "image_embeds", "image_tokens")


# ------------------------------------------------------------------------------------------------- primitives


def _linear(params: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """`W x + b` for the nn.Linear `name` of the state dict."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def _layer_norm(params: dict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's LayerNorm over the last dimension: biased variance, eps inside the square root."""
    mean = x.mean(dim=-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * params[f"{name}.weight"] + params[f"{name}.bias"]


def _softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    shifted = x - x.max(dim=dim, keepdim=True).values
    exp = torch.exp(shifted)
    return exp / exp.sum(dim=dim, keepdim=True)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log softmax of a 1-D vector."""
    shifted = x - x.max()
    return shifted - torch.log(torch.exp(shifted).sum())


def _cross_entropy_diagonal(scores: torch.Tensor) -> torch.Tensor:
    """Mean over rows i of -log softmax(scores[i])[i]: labels 0..B-1 (an aligned batch)."""
    rows = scores.shape[0]
    return sum(-_log_softmax(scores[i])[i] for i in range(rows)) / rows


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True))


# ------------------------------------------------------------------------------------------- SPEC 2: features


def _clip_features(params: dict, config, side: dict) -> dict[str, torch.Tensor]:
    clip_config = copy.deepcopy(config.clip_config)
    # SDPA, not "eager": transformers' eager CLIP attention takes its softmax in float32 even for float64 inputs.
    clip = CLIPModel._from_config(clip_config, attn_implementation="sdpa", dtype=torch.float64)
    clip_state = {key[len("clip.") :]: value for key, value in params.items() if key.startswith("clip.")}
    clip.load_state_dict(clip_state, strict=True)
    clip.eval()
    with torch.no_grad():
        out = clip(
            input_ids=side["input_ids"],
            attention_mask=side.get("attention_mask"),  # CLIP's own text mask; the matching itself masks nothing
            pixel_values=side["pixel_values"].to(torch.float64),
        )
    # CLIPModel's text_embeds and image_embeds are the projected, L2-normalised vectors.
    text_embeds = out.text_embeds  # (n, P)
    text_tokens = out.text_model_output.last_hidden_state  # (n, L, Ht)
    image_embeds = _linear(params, "image_embeds_proj", out.image_embeds)  # (n, d), Wvc
    image_tokens = _linear(params, "image_tokens_proj", out.vision_model_output.last_hidden_state)  # (n, N, d), Wvt
    return {
        "text_embeds": text_embeds,
        "text_tokens": text_tokens,
        "image_embeds": image_embeds,
        "image_tokens": image_tokens,
    }


# ---------------------------------------------------------------------------------------------------- SPEC 3


def _icl_one_modality(entity: torch.Tensor, mention: torch.Tensor, config) -> torch.Tensor:
    tau, w_inter, w_intra = config.icl_tau, config.icl_inter_weight, config.icl_intra_weight
    e, m = _unit_rows(entity), _unit_rows(mention)
    n = e.shape[0]
    s_em = e @ m.T / tau
    s_me = m @ e.T / tau
    s_ee = e @ e.T / tau
    s_mm = m @ m.T / tau
    off_diagonal = 1.0 - torch.eye(n, dtype=e.dtype)
    s_ee = s_ee * off_diagonal  # multiplied by 0: the zero stays in the softmax
    s_mm = s_mm * off_diagonal
    loss_e = [-_log_softmax(torch.cat([w_inter * s_em[i], w_intra * s_ee[i]]))[i] for i in range(n)]
    loss_m = [-_log_softmax(torch.cat([w_inter * s_me[i], w_intra * s_mm[i]]))[i] for i in range(n)]
    return (sum(loss_e) / n + sum(loss_m) / n) / 2


# -------------------------------------------------------------------------------------------------- SPEC 4.1


def _intra_modal_score(params, prefix, config, m_cls, m_tok, e_cls, e_tok) -> torch.Tensor:
    d = config.matching_dim
    g2g = m_cls @ e_cls.T  # (B, E)
    queries = _linear(params, f"{prefix}.query", e_tok)  # (E, Lx, d)
    keys = _linear(params, f"{prefix}.key", m_tok)  # (B, Lx, d)
    values = _linear(params, f"{prefix}.value", m_tok)  # (B, Lx, d)
    globals_ = _linear(params, f"{prefix}.global_proj", e_cls)  # (E, d)
    logits = torch.einsum("eid,bjd->ebij", queries, keys) / math.sqrt(d)  # (E, B, Lx, Lx)
    attention = _softmax(logits, dim=-1)  # over the mention's tokens j, no padding mask
    attended = torch.einsum("ebij,bjd->ebid", attention, values)  # (E, B, Lx, d): A[e, b] U_b
    context = _layer_norm(params, f"{prefix}.context_norm", attended.mean(dim=2), config.layer_norm_eps)  # (E, B, d)
    num_mentions, num_entities = m_cls.shape[0], e_cls.shape[0]
    g2l = torch.zeros(num_mentions, num_entities, dtype=torch.float64)
    for b in range(num_mentions):
        for e in range(num_entities):
            g2l[b, e] = (globals_[e] * context[e, b]).sum()
    return (g2g + g2l) / 2


# -------------------------------------------------------------------------------------------------- SPEC 4.2


def _match(params, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Match(p, q) for one sample: p (Lp, d), q (Lq, d) -> (Lp, d)."""
    name = "cross_modal_matching.match.proj"
    attention = _softmax(p @ _linear(params, name, q).T, dim=-1)  # (Lp, Lq), no 1/sqrt(d)
    return torch.relu(_linear(params, name, attention @ q))


def _multi_head(config, x: torch.Tensor) -> torch.Tensor:
    """MultiHead(X) for one sample: X (K, d) -> (d), mean over the CSRA heads."""
    heads = []
    for temperature in config.csra_temperatures:
        base = x.mean(dim=0)
        if temperature == CSRA_MAX_TEMPERATURE:
            attended = x.max(dim=0).values
        else:
            attended = (x * _softmax(temperature * x, dim=0)).sum(dim=0)
        heads.append(base + config.csra_lambda * attended)
    return sum(heads) / len(heads)


def _gated(params, config, anchor: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    gate = torch.tanh(_linear(params, "cross_modal_matching.gate", anchor))  # (1,)
    return _layer_norm(params, "cross_modal_matching.gate_norm", anchor * gate + context, config.layer_norm_eps)


def _cross_modal_vectors(params, config, feats: dict) -> dict[str, torch.Tensor]:
    """Per-side cross-modal vectors z (n, d): "text_to_image" always, "image_to_text" in bidirectional mode."""
    bidirectional = config.cross_modal == "bidirectional"
    n = feats["text_embeds"].shape[0]
    z_tv, z_vt = [], []
    for k in range(n):
        a = _linear(params, "cross_modal_matching.text_proj", feats["text_embeds"][k])  # (d), Wt t
        x = _linear(params, "cross_modal_matching.image_proj", feats["image_tokens"][k])  # (N, d), Wi V
        a_att = _match(params, a[None], x)  # (1, d)
        x_att = _match(params, x, a[None])  # (N, d)
        if bidirectional:
            context = _multi_head(config, torch.cat([a_att, x_att], dim=0))
        else:
            p, q = a_att[0], _multi_head(config, x_att)
            s = torch.sigmoid(
                _linear(params, "cross_modal_matching.fusion", q) + _linear(params, "cross_modal_matching.fusion", p)
            )
            context = p * s + q * (1 - s)
        z_tv.append(_gated(params, config, a, context))
        if bidirectional:
            c = _linear(params, "cross_modal_matching.image_proj", feats["image_embeds"][k])  # (d), Wi v
            y = _linear(params, "cross_modal_matching.text_proj", feats["text_tokens"][k])  # (L, d), Wt T
            c_att = _match(params, c[None], y)
            y_att = _match(params, y, c[None])
            context = _multi_head(config, torch.cat([c_att, y_att], dim=0))
            z_vt.append(_gated(params, config, c, context))
    vectors = {"text_to_image": torch.stack(z_tv)}
    if bidirectional:
        vectors["image_to_text"] = torch.stack(z_vt)
    return vectors


# ------------------------------------------------------------------------------------------------- the whole


def reference_outputs(
    params: dict[str, torch.Tensor], config, mention: dict, entity: dict, aligned: bool = False
) -> dict[str, torch.Tensor | None]:
    """
    SPEC sections 2-4 in float64. `params` is a state dict in `M3ELModel`'s naming (any dtype); `mention` and
    `entity` hold `input_ids`, `attention_mask` and `pixel_values`. With `aligned=True` (entity i is the gold
    entity of mention i) also the ICL loss and the training loss of SPEC 4.3.
    """
    params = {
        key: value.detach().to(torch.float64) if value.is_floating_point() else value.detach()
        for key, value in params.items()
    }
    eps = config.layer_norm_eps
    raw = {"mention": _clip_features(params, config, mention), "entity": _clip_features(params, config, entity)}

    normed = {}
    for side, feats in raw.items():
        normed[side] = {
            "text_embeds": _layer_norm(params, "text_embeds_norm", feats["text_embeds"], eps),  # LN_tc
            "text_tokens": _layer_norm(params, "text_tokens_norm", feats["text_tokens"], eps),  # LN_tt
            "image_embeds": _layer_norm(params, "image_embeds_norm", feats["image_embeds"], eps),  # LN_vc
            "image_tokens": _layer_norm(params, "image_tokens_norm", feats["image_tokens"], eps),  # LN_vt
        }
    m, e = normed["mention"], normed["entity"]

    branches = {}  # in the order of SPEC 4.3
    if config.use_text_matching:
        branches["text"] = _intra_modal_score(
            params, "text_matching", config, m["text_embeds"], m["text_tokens"], e["text_embeds"], e["text_tokens"]
        )
    if config.use_image_matching:
        branches["image"] = _intra_modal_score(
            params, "image_matching", config, m["image_embeds"], m["image_tokens"], e["image_embeds"], e["image_tokens"]
        )
    if config.use_cross_modal_matching:
        z_m = _cross_modal_vectors(params, config, m)
        z_e = _cross_modal_vectors(params, config, e)
        for name in z_m:
            branches[name] = z_m[name] @ z_e[name].T  # (B, E)
    logits = sum(branches.values()) / len(branches)

    outputs = {
        "logits": logits,
        "text_logits": branches.get("text"),
        "image_logits": branches.get("image"),
        "text_to_image_logits": branches.get("text_to_image"),
        "image_to_text_logits": branches.get("image_to_text"),
        "icl_loss": None,
        "loss": None,
    }
    if aligned:
        if logits.shape[0] != logits.shape[1]:
            raise ValueError(f"aligned=True needs as many entities as mentions, got {tuple(logits.shape)}")
        icl = None
        if config.use_icl:
            icl = (
                _icl_one_modality(raw["entity"]["text_embeds"], raw["mention"]["text_embeds"], config)
                + _icl_one_modality(raw["entity"]["image_embeds"], raw["mention"]["image_embeds"], config)
            ) / 2
        loss = _cross_entropy_diagonal(logits) + sum(_cross_entropy_diagonal(s) for s in branches.values())
        if icl is not None:
            loss = loss + icl
        outputs["icl_loss"], outputs["loss"] = icl, loss
    for side, feats in raw.items():
        for name in FEATURE_NAMES:
            outputs[f"{side}_{name}"] = feats[name]
    return outputs
