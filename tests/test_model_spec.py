"""M3ELModel against the independent float64 reference of SPEC.md (tests/spec_reference.py), on tiny models."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from spec_reference import FEATURE_NAMES, reference_outputs

from modeling_m3el import M3ELConfig, M3ELFeatures, M3ELModel
from modeling_m3el.tiny import tiny_config, tiny_processor

MODES = ("text_to_image", "bidirectional")
BRANCH_KEYS = ("text_logits", "image_logits", "text_to_image_logits", "image_to_text_logits")
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values")
WORDS = ("apple", "bank", "cat", "city", "dog", "paris", "photo", "river", "the")

# Tolerances: the model in float64 must agree with the reference to rounding; in float32 to float32 accuracy.
FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}
# Losses sum several cross-entropies of logits around 10; float64 rounding stays far below this.
FLOAT64_LOSS = {"rtol": 1e-10, "atol": 1e-10}

MENTIONS = [
    ("Cat", "the cat sat on the bank"),
    ("Paris%20city", "a photo of the river in paris"),  # percent-encoded mention
    ("dog", "x"),
    ("Apple", "the apple " * 30),  # long enough to be truncated to text_max_length
    ("bank", "river bank photo"),
]
ENTITIES = [
    ("Cat", "a small domesticated animal"),
    ("Paris", "the capital city of france, on the river seine"),
    ("Dog", "a dog"),
    ("Apple%20Inc.", "an american company"),
    ("Bank", "land beside a river; " * 6),
    ("River", "a natural stream of water"),
]


def _images() -> list:
    """Real images of several sizes and modes (the processor resizes them), and one missing image."""
    rng = np.random.default_rng(1234)
    gradient = np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3).astype(np.uint8)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
        Image.fromarray(gradient),
        None,  # no image: all zeros
        Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).convert("L"),
        Image.fromarray(rng.integers(0, 256, (20, 70, 4), dtype=np.uint8), mode="RGBA"),
        Image.fromarray(rng.integers(0, 256, (33, 33, 3), dtype=np.uint8)),
    ]


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(words=WORDS)


@pytest.fixture(scope="module")
def samples(processor):
    """Processed mentions and entities (all of MENTIONS and ENTITIES); slice them with `_take`."""
    images = _images()
    mentions = processor.process_mentions(
        [m for m, _ in MENTIONS], [s for _, s in MENTIONS], images=images[: len(MENTIONS)]
    )
    entities = processor.process_entities(
        [n for n, _ in ENTITIES], [d for _, d in ENTITIES], images=list(reversed(images))[: len(ENTITIES)]
    )
    return {"mention": mentions, "entity": entities}


def _take(batch, indices) -> dict[str, torch.Tensor]:
    return {key: batch[key][list(indices)] for key in INPUT_KEYS}


def _inputs(mention: dict, entity: dict) -> dict[str, torch.Tensor]:
    return {**mention, **{f"entity_{key}": value for key, value in entity.items()}}


def _perturb(model: M3ELModel, seed: int) -> M3ELModel:
    """Move every LayerNorm (CLIP's and the matching network's) away from weight 1, bias 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.add_(0.3 * torch.randn(module.bias.shape, generator=generator))
    return model


def _model(processor, seed: int = 0, **overrides) -> M3ELModel:
    torch.manual_seed(seed)
    model = M3ELModel(tiny_config(processor, **overrides))
    return _perturb(model, seed + 1).eval()


def _run(model, mention, entity, **kwargs):
    with torch.no_grad():
        return model(**_inputs(mention, entity), **kwargs)


def _assert_scores(output, reference, tolerance, config):
    torch.testing.assert_close(output.logits, reference["logits"].to(output.logits.dtype), **tolerance)
    for key in BRANCH_KEYS:
        if reference[key] is None:
            assert output.get(key) is None, f"{key} should be None for branches {config.branches}"
        else:
            torch.testing.assert_close(output[key], reference[key].to(output[key].dtype), **tolerance, msg=key)


# ------------------------------------------------------------------------------------------ the main checks


@pytest.mark.parametrize("mode", MODES)
def test_float64_model_matches_reference(processor, samples, mode):
    model = _model(processor, cross_modal=mode)
    mention, entity = _take(samples["mention"], range(5)), _take(samples["entity"], range(5))
    reference = reference_outputs(model.state_dict(), model.config, mention, entity, aligned=True)
    output = _run(model.double(), mention, entity, return_loss=True)

    assert output.logits.dtype == torch.float64 and output.logits.shape == (5, 5)
    _assert_scores(output, reference, FLOAT64, model.config)
    assert (output.image_to_text_logits is None) == (mode == "text_to_image")
    for side in ("mention", "entity"):
        for name in FEATURE_NAMES:
            torch.testing.assert_close(
                output[f"{side}_features"][name], reference[f"{side}_{name}"], rtol=1e-10, atol=1e-12
            )
    torch.testing.assert_close(output.icl_loss.double(), reference["icl_loss"], **FLOAT64_LOSS)
    torch.testing.assert_close(output.loss.double(), reference["loss"], **FLOAT64_LOSS)
    # The branches really differ: a swapped or dropped branch could not pass by accident.
    branch_values = [reference[key] for key in BRANCH_KEYS if reference[key] is not None]
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(branch_values, branch_values[1:]))


@pytest.mark.parametrize("mode", MODES)
def test_float64_model_keeps_float64_losses(processor, samples, mode):
    model = _model(processor, cross_modal=mode)
    mention, entity = _take(samples["mention"], range(4)), _take(samples["entity"], range(4))
    reference = reference_outputs(model.state_dict(), model.config, mention, entity, aligned=True)
    output = _run(model.double(), mention, entity, return_loss=True)
    assert output.icl_loss.dtype == torch.float64 and output.loss.dtype == torch.float64
    torch.testing.assert_close(output.icl_loss, reference["icl_loss"], **FLOAT64)
    torch.testing.assert_close(output.loss, reference["loss"], **FLOAT64)


@pytest.mark.parametrize("mode", MODES)
def test_float32_model_matches_reference(processor, samples, mode):
    model = _model(processor, seed=5, cross_modal=mode)
    mention, entity = _take(samples["mention"], range(4)), _take(samples["entity"], [1, 0, 3, 2])
    reference = reference_outputs(model.state_dict(), model.config, mention, entity, aligned=True)
    output = _run(model, mention, entity, return_loss=True)
    assert output.logits.dtype == torch.float32
    _assert_scores(output, reference, FLOAT32, model.config)
    torch.testing.assert_close(output.icl_loss.double(), reference["icl_loss"], **FLOAT32)
    torch.testing.assert_close(output.loss.double(), reference["loss"], **FLOAT32)


@pytest.mark.parametrize("mode", MODES)
def test_encode_score_and_entity_chunks_equal_forward(processor, samples, mode):
    """More entities than mentions; the two-step path and chunked entities give the forward's scores."""
    model = _model(processor, seed=7, cross_modal=mode).double()
    mention, entity = _take(samples["mention"], [3, 0]), _take(samples["entity"], range(6))
    reference = reference_outputs(model.state_dict(), model.config, mention, entity)
    output = _run(model, mention, entity)
    assert output.logits.shape == (2, 6)
    _assert_scores(output, reference, FLOAT64, model.config)

    with torch.no_grad():
        mention_features = model.encode(**mention, side="mention")
        entity_features = model.encode(**entity, side="entity")
        whole = model.score(mention_features, entity_features)
        chunked = {k: model.score(mention_features, entity_features, entity_chunk_size=k) for k in (1, 4, 6, 50)}
    for scores in (whole, *chunked.values()):
        assert set(scores.keys()) == {key for key in ("logits", *BRANCH_KEYS) if output.get(key) is not None}
        for key, value in scores.items():
            torch.testing.assert_close(value, output[key], rtol=1e-12, atol=1e-12, msg=key)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="entity_chunk_size must be positive"):
            model.score(mention_features, entity_features, entity_chunk_size=bad)


@pytest.mark.parametrize("mode", MODES)
def test_batch_size_one(processor, samples, mode):
    model = _model(processor, seed=11, cross_modal=mode).double()
    # One mention, one entity (an aligned batch of one: the loss is the ICL loss alone, every CE being 0).
    mention, entity = _take(samples["mention"], [1]), _take(samples["entity"], [1])
    reference = reference_outputs(model.state_dict(), model.config, mention, entity, aligned=True)
    output = _run(model, mention, entity, return_loss=True)
    assert output.logits.shape == (1, 1)
    _assert_scores(output, reference, FLOAT64, model.config)
    torch.testing.assert_close(output.icl_loss.double(), reference["icl_loss"], **FLOAT64_LOSS)
    torch.testing.assert_close(output.loss.double(), reference["loss"], **FLOAT64_LOSS)
    # One mention against many entities.
    entity = _take(samples["entity"], [5, 4, 3, 2])
    reference = reference_outputs(model.state_dict(), model.config, mention, entity)
    output = _run(model, mention, entity)
    assert output.logits.shape == (1, 4)
    _assert_scores(output, reference, FLOAT64, model.config)


# ---------------------------------------------------------------------------------------------- padding


def _resized_text(batch: dict, length: int) -> dict:
    """The batch with its texts cut to `length` tokens, or extended by repeating the last (padding) token."""

    def resize(x):
        return torch.cat([x, x[:, -1:].expand(-1, max(length - x.shape[1], 0))], dim=1)[:, :length]

    return {**batch, "input_ids": resize(batch["input_ids"]), "attention_mask": resize(batch["attention_mask"])}


def test_padding_is_part_of_the_computation(processor, samples):
    model = _model(processor, seed=13, cross_modal="bidirectional").double()
    length = model.config.text_max_length
    mention, entity = _take(samples["mention"], range(3)), _take(samples["entity"], range(3))
    real_lengths = mention["attention_mask"].sum(dim=1)
    assert mention["input_ids"].shape == (3, length)
    assert len(set(real_lengths.tolist())) == 3 and (real_lengths < length).all()  # three lengths, all padded
    base = _run(model, mention, entity)

    # Letting CLIP attend to a padded token changes the padded token states, hence the scores (no padding mask
    # in the matching); the reference, fed the same tokens and mask, agrees.
    first_pad = int(real_lengths[0])
    unmasked = {**mention, "attention_mask": mention["attention_mask"].clone()}
    unmasked["attention_mask"][0, first_pad] = 1
    output = _run(model, unmasked, entity)
    reference = reference_outputs(model.state_dict(), model.config, unmasked, entity)
    _assert_scores(output, reference, FLOAT64, model.config)
    assert not torch.allclose(output.logits[0], base.logits[0])
    torch.testing.assert_close(output.logits[1:], base.logits[1:], rtol=0, atol=0)  # other mentions untouched
    # The pooled text vector is read at the real end token, before the changed position: only the tokens moved.
    torch.testing.assert_close(output.mention_features.text_embeds, base.mention_features.text_embeds)

    # The padded token ids themselves enter the scores.
    repadded = {**mention, "input_ids": mention["input_ids"].clone()}
    repadded["input_ids"][0, -1] = processor.tokenizer.convert_tokens_to_ids("cat</w>")
    assert not torch.allclose(_run(model, repadded, entity).logits[0], base.logits[0])

    # Dropping padding, or adding some, is refused: the length is part of the model.
    with pytest.raises(ValueError, match=rf"`input_ids` must have shape \(num_mentions, {length}\).*text_max_length"):
        _run(model, _resized_text(mention, length - 1), entity)
    with pytest.raises(ValueError, match=rf"`input_ids` must have shape .*got \(3, {length + 1}\)"):
        _run(model, _resized_text(mention, length + 1), entity)
    with pytest.raises(ValueError, match=rf"`entity_input_ids` must have shape \(num_\w+, {length}\).*got \(3, 39\)"):
        _run(model, mention, _resized_text(entity, length - 1))

    # The same weights with longer padding (another text_max_length) give other scores.
    longer_processor = tiny_processor(words=WORDS, text_max_length=length + 8)
    longer = M3ELModel(tiny_config(longer_processor, cross_modal="bidirectional")).double().eval()
    longer.load_state_dict(model.state_dict())
    texts = ([m for m, _ in MENTIONS[:3]], [s for _, s in MENTIONS[:3]])
    names = ([n for n, _ in ENTITIES[:3]], [d for _, d in ENTITIES[:3]])
    longer_mention = _take(longer_processor.process_mentions(*texts, images=_images()[:3]), range(3))
    longer_entity = _take(longer_processor.process_entities(*names, images=_images()[::-1][:3]), range(3))
    longer_output = _run(longer, longer_mention, longer_entity)
    assert not torch.allclose(longer_output.logits, base.logits, atol=1e-6)
    reference = reference_outputs(longer.state_dict(), longer.config, longer_mention, longer_entity)
    _assert_scores(longer_output, reference, FLOAT64, longer.config)


# ------------------------------------------------------------------------------------------ missing image


@pytest.mark.parametrize("mode", MODES)
def test_missing_image_is_all_zeros(processor, samples, mode):
    model = _model(processor, seed=17, cross_modal=mode).double()
    no_image = processor.process_mentions(["dog"], ["a dog without a picture"], images=[None])
    assert not no_image["has_image"][0] and samples["mention"]["has_image"].tolist() == [True, True, False, True, True]
    assert torch.equal(no_image["pixel_values"], torch.zeros(1, 3, *processor.image_size))
    assert torch.count_nonzero(samples["entity"]["pixel_values"][3]) == 0  # entity 3 has no image either
    mention, entity = _take(no_image, [0]), _take(samples["entity"], [0, 3, 5])
    output = _run(model, mention, entity, has_image=no_image["has_image"])
    reference = reference_outputs(model.state_dict(), model.config, mention, entity)
    _assert_scores(output, reference, FLOAT64, model.config)
    # has_image is informational: the zeros are what the model scores.
    torch.testing.assert_close(_run(model, mention, entity).logits, output.logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_close_to_float32(processor, samples, mode, dtype):
    model = _model(processor, seed=19, cross_modal=mode)
    mention, entity = _take(samples["mention"], range(4)), _take(samples["entity"], range(4))
    full = _run(model, mention, entity, return_loss=True)
    half = _run(copy.deepcopy(model).to(dtype), mention, entity, return_loss=True)
    # bf16 keeps ~3 significant digits, fp16 ~4; the errors compound over CLIP and the matching network.
    relative = 0.03 if dtype == torch.bfloat16 else 0.005
    for key in ("logits", *BRANCH_KEYS, "icl_loss", "loss"):
        if full.get(key) is None:
            assert half.get(key) is None, key
            continue
        assert torch.isfinite(half[key]).all(), key
        scale = float(full[key].abs().max())
        torch.testing.assert_close(half[key].float(), full[key], rtol=0, atol=relative * scale, msg=key)
    # half-precision features and matching inputs; the scores themselves are computed and returned in float32
    assert half.mention_features.text_tokens.dtype == dtype and half.logits.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("mode", MODES)
def test_every_trainable_parameter_gets_a_gradient(processor, samples, mode):
    model = _model(processor, seed=23, cross_modal=mode).train()
    mention, entity = _take(samples["mention"], range(3)), _take(samples["entity"], range(3))
    model(**_inputs(mention, entity), return_loss=True).loss.backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert any(name.startswith("clip.") for name, _ in trainable)
    missing = [name for name, p in trainable if p.grad is None]
    zero = [name for name, p in trainable if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"all-zero gradient: {zero}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)


# ---------------------------------------------------------------------------------------------- ablations

ABLATIONS = [
    pytest.param({"use_text_matching": False}, id="no-text"),
    pytest.param({"use_image_matching": False}, id="no-image"),
    pytest.param({"use_cross_modal_matching": False}, id="no-cross-modal"),
    pytest.param({"use_icl": False}, id="no-icl"),
    pytest.param(
        {"cross_modal": "bidirectional", "use_text_matching": False, "use_icl": False}, id="bi-no-text-no-icl"
    ),
    pytest.param({"cross_modal": "bidirectional", "use_image_matching": False}, id="bi-no-image"),
    pytest.param({"cross_modal": "bidirectional", "use_cross_modal_matching": False}, id="bi-no-cross-modal"),
    pytest.param(
        {
            "cross_modal": "bidirectional",
            "csra_temperatures": [1.5, 99.0, 0.5],
            "csra_lambda": 0.7,
            "icl_tau": 0.1,
            "icl_inter_weight": 0.6,
            "icl_intra_weight": 0.3,
            "layer_norm_eps": 0.05,
        },
        id="bi-other-hyperparameters",
    ),
    pytest.param(
        {"csra_temperatures": [3.0], "csra_lambda": 0.2, "layer_norm_eps": 0.1, "matching_dim": 8},
        id="t2i-other-hyperparameters",
    ),
]


@pytest.mark.parametrize("overrides", ABLATIONS)
def test_ablations_match_reference(processor, samples, overrides):
    model = _model(processor, seed=29, **overrides)
    config = model.config
    mention, entity = _take(samples["mention"], range(3)), _take(samples["entity"], [2, 0, 1])
    reference = reference_outputs(model.state_dict(), config, mention, entity, aligned=True)
    output = _run(model.double(), mention, entity, return_loss=True)
    _assert_scores(output, reference, FLOAT64, config)
    branches = [key for key in BRANCH_KEYS if output.get(key) is not None]
    assert len(branches) == len(config.branches)
    torch.testing.assert_close(output.logits, sum(output[key] for key in branches) / len(branches))
    if config.use_icl:
        torch.testing.assert_close(output.icl_loss.double(), reference["icl_loss"], **FLOAT64_LOSS)
    else:
        assert output.icl_loss is None and reference["icl_loss"] is None
    torch.testing.assert_close(output.loss.double(), reference["loss"], **FLOAT64_LOSS)
    # Switched-off branches are not built.
    prefixes = {"text": "text_matching.", "image": "image_matching.", "text_to_image": "cross_modal_matching."}
    for branch, prefix in prefixes.items():
        assert any(key.startswith(prefix) for key in model.state_dict()) == (branch in config.branches)


# ------------------------------------------------------------------------------------------------- errors


def _bad_inputs(mention, entity, case):
    mention, entity = dict(mention), dict(entity)
    if case == "pixel_values_size":
        mention["pixel_values"] = torch.zeros(mention["pixel_values"].shape[0], 3, 16, 16)
    elif case == "pixel_values_3d":
        entity["pixel_values"] = entity["pixel_values"][0]
    elif case == "attention_mask_shape":
        mention["attention_mask"] = mention["attention_mask"][:, :-1]
    elif case == "input_ids_3d":
        mention["input_ids"] = mention["input_ids"][None]
        mention["attention_mask"] = mention["attention_mask"][None]
    elif case == "images_for_texts":
        entity["pixel_values"] = entity["pixel_values"][:1]
    return mention, entity


@pytest.mark.parametrize(
    "case, message",
    [
        ("pixel_values_size", r"`pixel_values` must have shape \(num_mentions, 3, 32, 32\); got \(2, 3, 16, 16\)"),
        ("pixel_values_3d", r"`entity_pixel_values` must have shape \(num_\w+, 3, 32, 32\); got \(3, 32, 32\)"),
        ("attention_mask_shape", r"`attention_mask` has shape \(2, 39\), but `input_ids` has \(2, 40\)"),
        ("input_ids_3d", r"`input_ids` must have shape \(num_mentions, 40\).*got \(1, 2, 40\)"),
        ("images_for_texts", r"1 images for 2 texts in the entity batch"),
    ],
)
def test_wrong_shapes_are_refused(processor, samples, case, message):
    model = _model(processor)
    mention, entity = _bad_inputs(_take(samples["mention"], range(2)), _take(samples["entity"], range(2)), case)
    with pytest.raises(ValueError, match=message):
        _run(model, mention, entity)


def test_entity_shape_errors_say_num_entities(processor, samples):
    model = _model(processor)
    mention, entity = _take(samples["mention"], range(2)), _take(samples["entity"], range(2))
    mention, entity = _bad_inputs(mention, entity, "pixel_values_3d")
    with pytest.raises(ValueError, match=r"\(num_entities, 3, 32, 32\)"):
        _run(model, mention, entity)


def test_loss_needs_an_aligned_batch(processor, samples):
    model = _model(processor)
    mention, entity = _take(samples["mention"], range(2)), _take(samples["entity"], range(3))
    with pytest.raises(ValueError, match=r"return_loss=True needs an aligned batch.*2 mentions and 3 entities"):
        _run(model, mention, entity, return_loss=True)
    assert _run(model, mention, entity).logits.shape == (2, 3)  # scoring alone is fine


def test_unknown_cross_modal_mode_is_refused(processor):
    with pytest.raises(ValueError, match=r"M3ELConfig\.cross_modal: unknown mode 'text2image'.*bidirectional"):
        tiny_config(processor, cross_modal="text2image")
    with pytest.raises(ValueError, match=r"M3ELConfig\.cross_modal"):
        M3ELConfig(cross_modal="image_to_text")


def test_score_refuses_foreign_features(processor, samples):
    model = _model(processor)
    with torch.no_grad():
        features = model.encode(**_take(samples["mention"], range(2)))
    with pytest.raises(TypeError, match="mention_features must be an M3ELFeatures"):
        model.score(dict(features), features)
    partial = M3ELFeatures(text_embeds=features.text_embeds, text_tokens=features.text_tokens)
    with pytest.raises(ValueError, match="entity_features must hold all four features"):
        model.score(features, partial)
