"""M3ELConfig: published defaults, JSON round trip, and a ValueError naming the field for every bad value."""

import pytest

from modeling_m3el import M3ELConfig
from modeling_m3el.tiny import tiny_config, tiny_processor


def test_defaults_are_the_published_recipe():
    config = M3ELConfig()
    assert config.matching_dim == 96 and config.text_max_length == 40 and config.text_separator == " [SEP] "
    assert config.cross_modal == "text_to_image"
    assert config.csra_temperatures == [2.0, 2.5, 3.5, 4.5, 99.0] and config.csra_lambda == 1.0
    assert (config.icl_tau, config.icl_inter_weight, config.icl_intra_weight) == (0.03, 1.0, 0.8)
    assert config.clip_config.projection_dim == 512
    assert config.clip_config.vision_config.hidden_size == 768 and config.clip_config.vision_config.patch_size == 32
    assert config.branches == ("text", "image", "text_to_image")
    assert M3ELConfig(cross_modal="bidirectional").branches == ("text", "image", "text_to_image", "image_to_text")


def test_round_trip(tmp_path):
    config = tiny_config(tiny_processor(), cross_modal="bidirectional", csra_temperatures=[2, 99], use_icl=False)
    assert config.csra_temperatures == [2.0, 99.0]
    config.save_pretrained(tmp_path)
    loaded = M3ELConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("cross_modal", "image_to_text", "unknown mode"),
        ("matching_dim", 0, "must be positive"),
        ("csra_temperatures", [], "at least one CSRA head"),
        ("csra_temperatures", [2.0, -1.0], "must be positive"),
        ("icl_tau", 0.0, "must be positive"),
        ("icl_inter_weight", -0.5, "must not be negative"),
        ("icl_intra_weight", -0.5, "must not be negative"),
        ("text_max_length", 1, r"must lie in \[2, 77\]"),
        ("text_max_length", 78, r"must lie in \[2, 77\]"),
        ("text_separator", "   ", "visible characters"),
        ("layer_norm_eps", 0.0, "must be positive"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError, match=rf"M3ELConfig\.{field}: .*{message}"):
        M3ELConfig(**{field: value})


def test_all_branches_off_is_refused():
    with pytest.raises(ValueError, match="at least one of the text, image and cross-modal branches"):
        M3ELConfig(use_text_matching=False, use_image_matching=False, use_cross_modal_matching=False)


def test_bidirectional_needs_text_width_equal_to_projection():
    clip = {"projection_dim": 256}  # text hidden size stays 512
    with pytest.raises(ValueError, match=r"M3ELConfig\.cross_modal: 'bidirectional'.*hidden_size \(512\).*\(256\)"):
        M3ELConfig(clip_config=clip, cross_modal="bidirectional")
    # Without the cross-modal branch, the widths may differ.
    M3ELConfig(clip_config=clip, cross_modal="bidirectional", use_cross_modal_matching=False)
