"""M3ELProcessor: texts and images exactly as SPEC section 1, every image source, and no silent image failures."""

import base64
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_m3el.tiny import tiny_processor

SIZE = 32
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(words=("paris", "hilton", "hotel"), image_size=SIZE)


def expected_pixels(image: Image.Image) -> torch.Tensor:
    """SPEC 1 by hand: Lanczos resize in the image's own mode, RGB, scale to [0, 1], CLIP mean/std, CHW."""
    resized = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).convert("RGB")
    array = (np.asarray(resized, dtype=np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(array.transpose(2, 0, 1)).float()


def random_image(seed=0, size=(57, 43), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def test_mention_and_entity_text_layout(processor):
    assert processor.mention_text("Paris%20Hilton", "She arrived.") == "Paris Hilton [SEP] She arrived."
    assert processor.entity_text("Hotel%C3%A9", "A hotel.") == "Hotelé [SEP] A hotel."
    inputs = processor.process_mentions("Paris%20Hilton", "at the hotel")
    expected = processor.tokenizer("Paris Hilton [SEP] at the hotel")["input_ids"]
    ids = inputs["input_ids"][0].tolist()
    assert ids[: len(expected)] == expected
    # Padded with the pad token to exactly text_max_length, attention mask zero there.
    assert len(ids) == processor.text_max_length == 40
    assert ids[len(expected) :] == [processor.tokenizer.pad_token_id] * (40 - len(expected))
    assert inputs["attention_mask"][0].tolist() == [1] * len(expected) + [0] * (40 - len(expected))
    # The literal [SEP] is kept (CLIP splits it into pieces).
    assert "]</w>" in processor.tokenizer.convert_ids_to_tokens(ids)


def test_long_text_is_truncated_to_max_length(processor):
    inputs = processor.process_entities("hilton", "hotel " * 100)
    ids = inputs["input_ids"][0]
    assert ids.shape == (40,)
    assert ids[-1].item() == processor.tokenizer.eos_token_id
    assert inputs["attention_mask"][0].sum().item() == 40


@pytest.mark.parametrize("source", ["path", "pil", "numpy", "bytes", "base64", "data_url"])
def test_image_sources_give_spec_pixels(processor, tmp_path, source):
    image = random_image(seed=1)
    path = tmp_path / "photo.png"
    image.save(path)
    raw = path.read_bytes()
    given = {
        "path": str(path),
        "pil": image,
        "numpy": np.asarray(image),
        "bytes": raw,
        "base64": base64.b64encode(raw).decode(),
        "data_url": "data:image/png;base64," + base64.b64encode(raw).decode(),
    }[source]
    inputs = processor.process_mentions("paris", "a photo", given)
    torch.testing.assert_close(inputs["pixel_values"][0], expected_pixels(image), atol=1e-5, rtol=0)
    assert inputs["has_image"].tolist() == [True]


def test_grayscale_and_png_named_jpg(processor, tmp_path):
    gray = random_image(seed=2, mode="L")
    path = tmp_path / "actually_png.jpg"  # a PNG under a .jpg name, as in the benchmarks' dirt
    gray.save(path, format="PNG")
    inputs = processor.process_entities("hilton", "x", str(path))
    torch.testing.assert_close(inputs["pixel_values"][0], expected_pixels(gray), atol=1e-5, rtol=0)
    # A gray image becomes three equal channels before normalisation.
    channels = inputs["pixel_values"][0] * torch.tensor(CLIP_STD).float()[:, None, None]
    channels = channels + torch.tensor(CLIP_MEAN).float()[:, None, None]
    torch.testing.assert_close(channels[0], channels[1], atol=1e-5, rtol=0)


def transparent_images() -> dict[str, Image.Image]:
    """Images with an alpha channel or a transparent palette entry, with colours under the transparent pixels."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (43, 57, 4), dtype=np.uint8), mode="RGBA")
    gray_alpha = Image.fromarray(rng.integers(0, 256, (43, 57, 2), dtype=np.uint8), mode="LA")
    palette = Image.fromarray(rng.integers(0, 256, (43, 57, 3), dtype=np.uint8), mode="RGB").quantize(16)
    palette.info["transparency"] = 0
    return {"RGBA": rgba, "LA": gray_alpha, "P with a transparent colour": palette}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P with a transparent colour"])
def test_transparency_keeps_the_authors_pixels(processor, tmp_path, mode):
    """An image with transparency gives the pixels of the authors' preprocessing (transformers 4.27: resize in the
    image's own mode, then PIL's plain RGB conversion, which keeps the colour under a transparent pixel), not those of
    transformers 5's conversion, which composites transparency onto white: from a PIL image and from a PNG file."""
    image = transparent_images()[mode]
    path = tmp_path / "logo.png"
    image.save(path)
    for given in (image, str(path)):
        inputs = processor.process_entities("hilton", "a logo", given)
        torch.testing.assert_close(inputs["pixel_values"][0], expected_pixels(image), atol=1e-5, rtol=0)
    white = image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).convert("RGBA")
    white = Image.alpha_composite(Image.new("RGBA", white.size, (255, 255, 255, 255)), white).convert("RGB")
    assert not torch.allclose(inputs["pixel_values"][0], expected_pixels(white), atol=1e-3)  # it would differ


def test_missing_image_is_zeros_with_flag(processor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no image is not an error: no warning either
        inputs = processor.process_mentions(["paris", "hilton"], ["a", "b"], [None, random_image()])
    assert torch.count_nonzero(inputs["pixel_values"][0]) == 0
    assert torch.count_nonzero(inputs["pixel_values"][1]) > 0
    assert inputs["has_image"].tolist() == [False, True]
    assert processor.process_mentions("paris", "no image given")["has_image"].tolist() == [False]


def test_unreadable_image_warns_names_it_and_counts(tmp_path):
    processor = tiny_processor(image_size=SIZE)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    missing = tmp_path / "missing.jpg"
    with pytest.warns(UserWarning, match="broken.jpg") as record:
        inputs = processor.process_mentions(
            ["a", "b", "c"], ["x", "y", "z"], [str(broken), random_image(), str(missing)]
        )
    messages = [str(w.message) for w in record]
    assert any("missing.jpg" in m and "no such image file" in m for m in messages)
    assert processor.num_unreadable_images == 2
    assert inputs["has_image"].tolist() == [False, True, False]
    assert torch.count_nonzero(inputs["pixel_values"][0]) == 0
    assert torch.count_nonzero(inputs["pixel_values"][2]) == 0
    with pytest.warns(UserWarning, match="3 unreadable so far"):
        processor.process_entities("e", "d", b"\x00\x01garbage")


@pytest.mark.parametrize("num_workers", [0, 1, 3])
def test_prefetched_batches_equal_one_by_one(tmp_path, num_workers):
    # Images read in threads ahead of use: the same inputs, in order, the unreadable ones warned about and counted.
    processor = tiny_processor(words=("paris", "hilton"), image_size=SIZE)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    paths = []
    for i in range(11):
        paths.append(str(tmp_path / f"{i}.png"))
        random_image(i, size=(30 + i, 20 + 2 * i)).save(paths[-1])
    images = paths[:4] + [str(broken), None] + paths[4:] + [str(broken)]
    names = [f"paris {i}" for i in range(len(images))]
    batches = [(names[i : i + 3], ["hilton"] * len(names[i : i + 3]), images[i : i + 3]) for i in range(0, 13, 3)]
    reference = tiny_processor(words=("paris", "hilton"), image_size=SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (its own warnings about the broken image)
        expected = [reference.process_entities(*batch) for batch in batches]
    with pytest.warns(UserWarning, match="broken.jpg") as record:
        outputs = list(processor.prefetched("entity", iter(batches), num_workers=num_workers))
    assert len(outputs) == len(expected) == 5 and sum(1 for w in record if "broken.jpg" in str(w.message)) == 2
    for got, want in zip(outputs, expected):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert processor.num_unreadable_images == 2
    mentions = list(processor.prefetched("mention", [(["paris"], ["s"], [paths[0]], ["the post's image"])],
                                         num_workers))
    assert torch.equal(mentions[0]["input_ids"], processor.process_mentions(["paris"], ["s"], [paths[0]])["input_ids"])
    # a bad batch raises where it is reached, in the caller's thread
    with pytest.raises(ValueError, match="got 1 images for 2 texts"):
        list(processor.prefetched("entity", [(["a", "b"], ["c", "d"], [None])], num_workers))
    with pytest.raises(ValueError, match="side must be"):
        next(processor.prefetched("kb", [], num_workers))


def test_call_builds_model_inputs_for_both_sides(processor):
    inputs = processor(
        mentions=["paris", "hilton"],
        sentences=["one", "two"],
        images=[random_image(3), None],
        entity_names=["Paris", "Hilton", "Hotel"],
        entity_descriptions=["city", "family", "building"],
        entity_images=[None, None, random_image(4)],
    )
    assert set(inputs) == {
        "input_ids", "attention_mask", "pixel_values", "has_image",
        "entity_input_ids", "entity_attention_mask", "entity_pixel_values", "entity_has_image",
    }
    assert inputs["input_ids"].shape == (2, 40) and inputs["entity_input_ids"].shape == (3, 40)
    assert inputs["pixel_values"].shape == (2, 3, SIZE, SIZE)
    assert inputs["entity_has_image"].tolist() == [False, False, True]
    separate = processor.process_entities(["Paris", "Hilton", "Hotel"], ["city", "family", "building"])
    assert torch.equal(inputs["entity_input_ids"], separate["input_ids"])


def test_bad_calls_have_clear_errors(processor):
    with pytest.raises(ValueError, match="2 mentions but 1 sentences"):
        processor.process_mentions(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="got 1 images for 2 texts"):
        processor.process_mentions(["a", "b"], ["x", "y"], [None])
    with pytest.raises(ValueError, match="mentions need their sentences"):
        processor(mentions=["a"])
    with pytest.raises(ValueError, match="give mentions"):
        processor()
    with pytest.raises(ValueError, match="sample 1"):
        processor.process_entities(["a", 3], ["x", "y"])


def test_every_form_of_base64_and_data_url_gives_the_same_pixels(processor, tmp_path, monkeypatch):
    """Base64 with line breaks (as the `base64` command writes it) and URL-safe base64; a data URL of any media type
    (the bytes say what the image is). A data URL that is not base64 is refused, and never read as a path."""
    import io

    image = random_image(7)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    expected = processor.load_image(data)[0]
    standard = base64.b64encode(data).decode()
    assert "+" in standard or "/" in standard  # so that the URL-safe form differs from it
    forms = [
        "\n".join(standard[i : i + 76] for i in range(0, len(standard), 76)),
        base64.urlsafe_b64encode(data).decode(),
        "data:application/octet-stream;base64," + standard,
        "data:;base64," + standard,
        "data:image/png;BASE64," + standard,
    ]
    for form in forms:
        pixels, readable = processor.load_image(form)
        assert readable and torch.equal(pixels, expected), form[:40]
    image.save(tmp_path / "data:,hosts", format="PNG")  # an image where such a data URL would be read as a path
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad, reason in [
            ("data:,hosts", "must be base64-encoded"),
            ("data:image/png;base64,%%%", "not valid base64"),
            ("", "an empty string is not an image"),
            ("cat-1234", "no such image file: cat-1234 (nor base64 of an image)"),
            (b"garbage", "not an image format PIL reads (7 bytes)"),
        ]:
            pixels, readable = processor.load_image(bad)
            assert not readable and not pixels.any()
            assert reason in str(caught[-1].message) and "BytesIO" not in str(caught[-1].message)


def test_a_batch_needs_a_list_of_images_and_at_least_one_sample(processor):
    with pytest.raises(ValueError, match="the images must be a list too"):
        processor.process_mentions(["a", "b"], ["x", "y"], "image.jpg")
    with pytest.raises(ValueError, match="no samples"):
        processor(mentions=[], sentences=[])
    with pytest.raises(ValueError, match="no samples"):
        processor.process_entities([], [])


def test_return_tensors_pt_is_accepted_and_nothing_else(processor):
    a = processor(mentions="paris", sentences="s", return_tensors="pt")
    b = processor(mentions="paris", sentences="s")
    assert all(torch.equal(a[key], b[key]) for key in b)
    with pytest.raises(ValueError, match="PyTorch tensors only"):
        processor(mentions="paris", sentences="s", return_tensors="np")


def test_a_dtype_given_to_from_pretrained_is_not_kept(tmp_path):
    """`pipeline(..., dtype=...)` passes the dtype to the processor too; saving must still work."""
    processor = tiny_processor(words=("paris",), image_size=SIZE)
    processor.save_pretrained(tmp_path / "a")
    reloaded = type(processor).from_pretrained(tmp_path / "a", dtype=torch.bfloat16, torch_dtype=torch.float16)
    reloaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "tokenizer_config.json").is_file()


def test_save_and_reload_keeps_settings(tmp_path):
    from transformers import AutoProcessor

    import modeling_m3el  # noqa: F401  (registers M3ELProcessor with AutoProcessor)

    processor = tiny_processor(words=("paris",), image_size=SIZE, text_max_length=24)
    processor.text_separator = " | "
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded).__name__ == "M3ELProcessor"
    assert reloaded.text_max_length == 24 and reloaded.text_separator == " | "
    image = random_image(5)
    a = processor.process_mentions("paris", "s", image)
    b = reloaded.process_mentions("paris", "s", image)
    for key in a:
        assert torch.equal(a[key], b[key]), key
