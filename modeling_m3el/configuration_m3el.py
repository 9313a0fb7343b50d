"""M3EL configuration: the CLIP backbone plus every hyper-parameter of the multi-level matching network."""

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig, PreTrainedConfig

CROSS_MODAL_MODES = ("text_to_image", "bidirectional")


@strict
class M3ELConfig(PreTrainedConfig):
    r"""
    Configuration of [`M3ELModel`], the Multi-level Matching Network for Multimodal Entity Linking
    (KDD 2025, arXiv 2412.10440). The defaults reproduce the authors' published configuration on top of
    `openai/clip-vit-base-patch32`.

    Args:
        clip_config (`dict` or [`CLIPConfig`], *optional*):
            Configuration of the shared CLIP backbone that encodes mentions and entities alike.
        matching_dim (`int`, *optional*, defaults to 96):
            Width `d` of the matching network: image features are mapped to it, and every matching block
            works in it (96 in every published config).
        cross_modal (`str`, *optional*, defaults to `"text_to_image"`):
            Cross-modal matching block: `"text_to_image"` (text-to-visual with fusion; the authors' choice for
            WikiMEL and RichpediaMEL) or `"bidirectional"` (text-to-visual and visual-to-text; their choice for
            WikiDiverse). `"bidirectional"` needs the CLIP text width to equal the projection width.
        csra_temperatures (`list[float]`, *optional*, defaults to `(2.0, 2.5, 3.5, 4.5, 99.0)`):
            One temperature per CSRA head of the cross-modal pooling. The value 99 selects max pooling, as in
            the CSRA paper and the authors' code.
        csra_lambda (`float`, *optional*, defaults to 1.0):
            Weight of the attention term of every CSRA head.
        icl_tau (`float`, *optional*, defaults to 0.03):
            Temperature of the intra-modal contrastive loss (ICL).
        icl_inter_weight (`float`, *optional*, defaults to 1.0):
            ICL weight of the mention-entity (inter-source) similarities.
        icl_intra_weight (`float`, *optional*, defaults to 0.8):
            ICL weight of the entity-entity and mention-mention (intra-source) similarities.
        text_max_length (`int`, *optional*, defaults to 40):
            Every text is truncated and padded to exactly this many tokens. The matching does not mask padding,
            so this length is part of the model: inputs of another length are refused.
        text_separator (`str`, *optional*, defaults to `" [SEP] "`):
            Joins the mention to its sentence and the entity name to its description. Kept literally because
            trained checkpoints expect it.
        use_text_matching (`bool`, *optional*, defaults to `True`):
            Score with the textual intra-modal block (off: the "w/o text" ablation).
        use_image_matching (`bool`, *optional*, defaults to `True`):
            Score with the visual intra-modal block (off: the "w/o image" ablation).
        use_cross_modal_matching (`bool`, *optional*, defaults to `True`):
            Score with the cross-modal block (off: the "w/o cross-modal" ablation).
        use_icl (`bool`, *optional*, defaults to `True`):
            Add the intra-modal contrastive loss to the training objective (off: the "w/o ICL" ablation).
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of every LayerNorm of the matching network (PyTorch's default, as in the authors' code).
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation used by the generic initialisation of modules other than linear layers.

    Example:

    ```python
    >>> from modeling_m3el import M3ELConfig, M3ELModel
    >>> config = M3ELConfig(cross_modal="bidirectional")
    >>> model = M3ELModel(config)  # random weights; use M3ELModel.from_clip(...) to start from CLIP
    ```
    """

    model_type = "m3el"
    sub_configs_defaults = {"clip_config": CLIPConfig}

    clip_config: dict | CLIPConfig | None = None
    matching_dim: int = 96
    cross_modal: str = "text_to_image"
    csra_temperatures: list[int | float] | tuple[int | float, ...] = (2.0, 2.5, 3.5, 4.5, 99.0)  # 5 heads, authors' config
    csra_lambda: float = 1.0
    icl_tau: float = 0.03  # authors' config
    icl_inter_weight: float = 1.0
    icl_intra_weight: float = 0.8
    text_max_length: int = 40
    text_separator: str = " [SEP] "
    use_text_matching: bool = True
    use_image_matching: bool = True
    use_cross_modal_matching: bool = True
    use_icl: bool = True
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.csra_temperatures = [float(t) for t in self.csra_temperatures]
        self._check_values()

    def _check_values(self):
        def fail(field, message):
            raise ValueError(f"M3ELConfig.{field}: {message}")

        if self.cross_modal not in CROSS_MODAL_MODES:
            fail("cross_modal", f"unknown mode {self.cross_modal!r}; expected one of {', '.join(CROSS_MODAL_MODES)}")
        if self.matching_dim <= 0:
            fail("matching_dim", f"must be positive, got {self.matching_dim}")
        if len(self.csra_temperatures) == 0:
            fail("csra_temperatures", "needs at least one CSRA head")
        if any(t <= 0 for t in self.csra_temperatures):
            fail("csra_temperatures", f"temperatures must be positive, got {self.csra_temperatures}")
        if self.icl_tau <= 0:
            fail("icl_tau", f"must be positive, got {self.icl_tau}")
        if self.icl_inter_weight < 0 or self.icl_intra_weight < 0:
            fail("icl_inter_weight" if self.icl_inter_weight < 0 else "icl_intra_weight", "must not be negative")
        max_positions = self.clip_config.text_config.max_position_embeddings
        if not 2 <= self.text_max_length <= max_positions:
            fail("text_max_length", f"must lie in [2, {max_positions}] (CLIP's positions), got {self.text_max_length}")
        if not self.text_separator.strip():
            fail("text_separator", "must contain visible characters")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", f"must be positive, got {self.layer_norm_eps}")
        if not (self.use_text_matching or self.use_image_matching or self.use_cross_modal_matching):
            fail("use_text_matching", "at least one of the text, image and cross-modal branches must be on")
        if (
            self.cross_modal == "bidirectional"
            and self.use_cross_modal_matching
            and self.clip_config.text_config.hidden_size != self.clip_config.projection_dim
        ):
            fail(
                "cross_modal",
                "'bidirectional' maps text tokens with the text projection, so CLIP's text hidden_size "
                f"({self.clip_config.text_config.hidden_size}) must equal its projection_dim "
                f"({self.clip_config.projection_dim})",
            )

    @property
    def branches(self) -> tuple[str, ...]:
        """Names of the score branches this configuration uses, in the order they are averaged."""
        names = []
        if self.use_text_matching:
            names.append("text")
        if self.use_image_matching:
            names.append("image")
        if self.use_cross_modal_matching:
            names.append("text_to_image")
            if self.cross_modal == "bidirectional":
                names.append("image_to_text")
        return tuple(names)


__all__ = ["M3ELConfig"]
