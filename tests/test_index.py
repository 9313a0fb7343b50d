"""EntityIndex and the exact ranker: same scores as forward, chunking invisible, save/load, stale indexes refused."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_m3el import M3ELModel
from modeling_m3el.index_m3el import INDEX_META, INDEX_WEIGHTS, EntityIndex, StaleIndexError, model_fingerprint
from modeling_m3el.tiny import tiny_config, tiny_processor

MODES = ("text_to_image", "bidirectional")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor(words=("river", "bank", "city"))


def _images(count, seed):
    rng = np.random.default_rng(seed)
    return [
        None if i % 4 == 3 else Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def kb():
    images = _images(13, seed=0)  # 13 entities: not a multiple of any chunk size used below
    return [
        {"id": f"Q{i}", "name": f"entity {i % 5}", "description": f"river bank {i}", "image": images[i]}
        for i in range(13)
    ]


@pytest.fixture(scope="module")
def mentions(processor):
    return processor.process_mentions(
        ["entity 1", "city", "entity 4"], ["the river bank", "a city", "x"], _images(3, seed=1)
    )


def _model(processor, mode, seed=0):
    torch.manual_seed(seed)
    model = M3ELModel(tiny_config(processor, cross_modal=mode)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and not name.startswith("clip."):
                param.add_(0.2 * torch.randn_like(param))
    return model


def _forward_logits(model, processor, mentions, kb):
    entity_inputs = processor.process_entities(
        [e["name"] for e in kb], [e["description"] for e in kb], [e["image"] for e in kb]
    )
    with torch.no_grad():
        return model(**mentions, **{f"entity_{k}": v for k, v in entity_inputs.items()}).logits


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
def test_exact_ranker_equals_forward(processor, kb, mentions, mode, chunk_size):
    model = _model(processor, mode)
    expected = _forward_logits(model, processor, mentions, kb)
    index = EntityIndex.build(model, processor, kb, batch_size=5, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    scores = index.scores(model, features, chunk_size=chunk_size)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # One mention alone gives its row.
    single = index.scores(model, type(features)(**{k: v[1:2] for k, v in features.items()}), chunk_size=chunk_size)
    torch.testing.assert_close(single, expected[1:2], rtol=1e-5, atol=1e-5)


def test_cpu_pieces_change_no_result(processor, kb, mentions):
    # On the CPU the PyTorch path works in pieces of at most `cpu_piece_bytes`, whatever the budget: pieces of one
    # entity or one candidate give the same scores, ranks and top-k as one piece for everything.
    model = _model(processor, "bidirectional")
    expected = _forward_logits(model, processor, mentions, kb)
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    gold, rows = ["Q3", "Q0", "Q12"], torch.tensor([[0, 5, 12, 5], [1, 1, 2, 3], [12, 11, 10, 9]])
    whole = (index.rank(model, features, gold), index.topk(model, features, k=4),
             index.score_candidates(model, features, rows))
    assert index._piece_bytes(2**30) == EntityIndex.cpu_piece_bytes < 2**30
    index.cpu_piece_bytes = 1
    assert index._piece_bytes(2**30) == 1 and index.chunk_size_for(3, index._piece_bytes(2**30)) == 1
    torch.testing.assert_close(index.scores(model, features), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(index.rank(model, features, gold), whole[0])
    values, top_rows, _ = index.topk(model, features, k=4)
    torch.testing.assert_close(values, whole[1][0])
    assert torch.equal(top_rows, whole[1][1])
    torch.testing.assert_close(index.score_candidates(model, features, rows), whole[2])
    torch.testing.assert_close(whole[2], expected.gather(1, rows), rtol=1e-5, atol=1e-5)


def test_ranks_and_topk_follow_the_spec(processor, kb, mentions):
    model = _model(processor, "text_to_image")
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    scores = index.scores(model, features)
    gold = ["Q3", "Q0", "Q12"]
    ranks = index.rank(model, features, gold, chunk_size=3)
    for row, entity_id in enumerate(gold):
        gold_score = scores[row, int(entity_id[1:])]
        assert ranks[row].item() == int((scores[row] >= gold_score).sum())
    values, rows, ids = index.topk(model, features, k=4)
    expected_values, expected_rows = scores.topk(4, dim=1)
    torch.testing.assert_close(values, expected_values)
    assert torch.equal(rows, expected_rows)
    assert ids == [[kb[r]["id"] for r in row] for row in expected_rows.tolist()]
    assert index.topk(model, features, k=50)[0].shape == (3, 13)  # k larger than the KB: the whole KB


def test_ties_count_against_the_gold(processor, kb, mentions):
    # Two entities with identical content get identical scores: whichever is gold ranks behind its twin. (Their
    # dot-product vectors are set to 0 here: a matrix product may round a row or column differently by its position
    # in the batch, as the CPU products of PyTorch 2.6 and 2.7 do by one float32 step, and on some CPUs those that
    # make the index's cross-modal vectors; products with 0 are exact in any order. Their G2L parts are computed
    # alike, pair by pair.)
    twin_kb = kb + [dict(kb[2], id="Q2-twin")]
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, twin_kb, progress=False)
    for name, tensor in index.tensors.items():
        if tensor.dim() == 2 and not name.endswith(".global"):  # G2G and cross-modal vectors, not G2L's
            torch.testing.assert_close(tensor[2], tensor[13], rtol=1e-6, atol=1e-6, msg=name)
            tensor[[2, 13]] = 0
        else:
            assert torch.equal(tensor[2], tensor[13]), name
    with torch.no_grad():
        features = model.encode(**mentions)
    scores = index.scores(model, features)
    assert torch.equal(scores[:, 2], scores[:, 13])
    ranks_original = index.rank(model, features, ["Q2"] * 3)
    ranks_twin = index.rank(model, features, ["Q2-twin"] * 3)
    assert torch.equal(ranks_original, ranks_twin)
    assert torch.equal(ranks_original, (scores >= scores[:, 2:3]).sum(dim=1))
    assert (ranks_original >= 2).all()


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(processor, kb, mentions, tmp_path, mode):
    model = _model(processor, mode)
    index = EntityIndex.build(model, processor, kb, progress=False)
    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [INDEX_META, INDEX_WEIGHTS]
    meta = json.loads((tmp_path / INDEX_META).read_text())
    assert meta["entity_ids"] == [e["id"] for e in kb] and meta["fingerprint"] == model_fingerprint(model)
    loaded = EntityIndex.load(tmp_path, model)
    assert loaded.entity_ids == index.entity_ids and loaded.device == model.device  # the model's device by default
    for name, tensor in index.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    with torch.no_grad():
        features = model.encode(**mentions)
    assert torch.equal(loaded.scores(model, features), index.scores(model, features))


def test_index_keeps_only_what_scoring_needs(processor, kb):
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, kb, progress=False)
    d = model.config.matching_dim
    p = model.config.clip_config.projection_dim
    length = model.config.text_max_length
    patches = (model.config.clip_config.vision_config.image_size // model.config.clip_config.vision_config.patch_size) ** 2 + 1
    shapes = {name: tuple(t.shape[1:]) for name, t in index.tensors.items()}
    assert shapes == {
        "text.embeds": (p,), "text.query": (length, d), "text.global": (d,),
        "image.embeds": (d,), "image.query": (patches, d), "image.global": (d,),
        "cross_modal.text_to_image": (d,), "cross_modal.image_to_text": (d,),
    }
    assert index.to(dtype=torch.bfloat16).nbytes * 2 == index.nbytes


def test_kb_updates_by_concat_and_select(processor, kb, mentions):
    # New entities are encoded alone and appended; retired ones dropped: the same index as building the KB anew.
    model = _model(processor, "bidirectional")
    whole = EntityIndex.build(model, processor, kb, progress=False)
    grown = EntityIndex.concat([EntityIndex.build(model, processor, kb[:8], progress=False),
                                EntityIndex.build(model, processor, kb[8:], batch_size=2, progress=False)])
    # (and images read by two threads ahead of the model: the same index)
    threaded = EntityIndex.build(model, processor, kb, batch_size=3, num_workers=2, progress=False)
    for index in (grown, threaded):
        assert index.entity_ids == whole.entity_ids and index.fingerprint == whole.fingerprint
        for name, tensor in whole.tensors.items():
            torch.testing.assert_close(index.tensors[name], tensor, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        features = model.encode(**mentions)
    kept = ["Q12", "Q0", "Q5", "Q3"]  # any order
    subset = grown.select(kept)
    assert subset.entity_ids == kept and len(subset) == 4
    scores = whole.scores(model, features)
    torch.testing.assert_close(subset.scores(model, features), scores[:, [12, 0, 5, 3]], rtol=1e-5, atol=1e-5)
    assert torch.equal(subset.rank(model, features, ["Q3", "Q0", "Q12"]),
                       (scores[:, [12, 0, 5, 3]] >= scores[:, [3, 0, 12]].diagonal()[:, None]).sum(dim=1))
    # what cannot be joined or selected, said
    with pytest.raises(StaleIndexError, match="index 1 of concat was built with another model"):
        EntityIndex.concat([whole, EntityIndex.build(_model(processor, "bidirectional", seed=1), processor, kb[:1],
                                                     progress=False)])
    with pytest.raises(ValueError, match="index 1 of concat is torch.bfloat16"):
        EntityIndex.concat([subset, whole.select(["Q1"]).to(dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match=r"duplicate entity ids in the index: \['Q5'\]"):
        EntityIndex.concat([subset, whole.select(["Q5"])])
    with pytest.raises(ValueError, match="at least one"):
        EntityIndex.concat([])
    with pytest.raises(KeyError, match="'Q99' is not in the index"):
        whole.select(["Q1", "Q99"])
    with pytest.raises(ValueError, match="needs at least one entity"):
        whole.select([])


def test_stale_index_is_refused(processor, kb, tmp_path):
    model = _model(processor, "text_to_image")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    other = _model(processor, "text_to_image", seed=1)
    with pytest.raises(StaleIndexError, match="built with another model"):
        EntityIndex.load(tmp_path, other)
    # One optimiser step on the same model also makes it stale.
    with torch.no_grad():
        model.text_matching.query.bias.add_(1e-2)
    with pytest.raises(StaleIndexError):
        EntityIndex.load(tmp_path, model)
    # The same weights in bfloat16 are the same model.
    with torch.no_grad():
        model.text_matching.query.bias.sub_(1e-2)
    EntityIndex.load(tmp_path, model.to(torch.bfloat16))


def test_scoring_refuses_a_changed_model_and_hashes_only_after_a_change(processor, kb, mentions, monkeypatch):
    """`scores`, `rank`, `topk` and `score_candidates` refuse a model the index was not built with, as `load` does;
    they hash its weights only when the model is not the one last checked or has changed since."""
    import modeling_m3el.index_m3el as index_module

    hashes = []
    real = index_module.model_fingerprint
    monkeypatch.setattr(index_module, "model_fingerprint", lambda *a, **k: hashes.append(1) or real(*a, **k))
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    rows = torch.zeros(3, 2, dtype=torch.long)

    def use_all(index, model):
        index.scores(model, features)
        index.rank(model, features, ["Q1", "Q2", "Q3"])
        index.topk(model, features, k=2)
        index.topk(model, features, k=2, candidates=4)
        index.score_candidates(model, features, rows)

    expected = index.scores(model, features)
    use_all(index, model)
    use_all(index.to(dtype=torch.float64), model)  # a cast of the index: the same fingerprints
    assert hashes == []  # built with this model, unchanged since
    # One optimiser step (any in-place write) makes the index stale: every scoring call refuses it.
    parameter = model.text_matching.query.bias
    saved = parameter.detach().clone()
    with torch.no_grad():
        parameter.add_(1e-2)
    for call in (lambda: index.scores(model, features), lambda: index.rank(model, features, ["Q1", "Q2", "Q3"]),
                 lambda: index.topk(model, features, k=2), lambda: index.score_candidates(model, features, rows)):
        with pytest.raises(StaleIndexError, match="built with another model"):
            call()
    # The weights written back: the model passes again, after one more check (a hash per rounding tried, at most 2).
    with torch.no_grad():
        parameter.copy_(saved)
    hashes.clear()
    torch.testing.assert_close(index.scores(model, features), expected, rtol=0, atol=0)
    assert 1 <= len(hashes) <= 2
    hashes.clear()
    use_all(index, model)
    assert hashes == []
    # Another model of the same architecture is refused; the same checkpoint loaded again, or cast, is not.
    with pytest.raises(StaleIndexError):
        index.scores(_model(processor, "bidirectional", seed=1), features)
    again = _model(processor, "bidirectional")
    torch.testing.assert_close(index.scores(again, features), expected, rtol=0, atol=0)
    half = _model(processor, "bidirectional").to(torch.bfloat16)
    with torch.no_grad():
        half_scores = index.to(dtype=torch.bfloat16).scores(half, half.encode(**mentions))
    torch.testing.assert_close(half_scores.float(), expected, rtol=0, atol=0.05)
    # A config change is a change: checked again (it passes, this field does not enter the fingerprint).
    hashes.clear()
    model.config.architectures = ["Renamed"]
    index.scores(model, features)
    assert 1 <= len(hashes) <= 2
    # A step of a fused optimizer, which leaves the weights' version counters as they are, is seen too.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for weight in model.parameters():
        weight.grad = torch.ones_like(weight)
    optimizer.step()
    with pytest.raises(StaleIndexError):
        index.scores(model, features)
    # ... while a step of an optimizer over other weights is not a change of this model: no hash.
    again = _model(processor, "bidirectional")
    index.scores(again, features)
    other = torch.nn.Linear(3, 1)
    other.weight.grad, other.bias.grad = torch.ones_like(other.weight), torch.ones_like(other.bias)
    for fused in (True, False):
        torch.optim.SGD(other.parameters(), lr=0.1, fused=fused).step()
    hashes.clear()
    torch.testing.assert_close(index.scores(again, features), expected, rtol=0, atol=0)
    assert hashes == []
    # A pickled or copied index checks the model once; torch.compile's wrapper is the model it wraps.
    import copy
    import pickle

    for duplicate in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        hashes.clear()
        torch.testing.assert_close(duplicate.scores(again, features), expected, rtol=0, atol=0)
        assert 1 <= len(hashes) <= 2
    with warnings.catch_warnings():  # (importing torch.compile's machinery warns of torch.jit's deprecations)
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(again)
    torch.testing.assert_close(index.scores(compiled, features), expected, rtol=0, atol=0)

def test_fingerprint_is_the_documented_hash(processor):
    """The fingerprint's bytes are those saved indexes (and published ones) were stamped with: blake2b-128 of the
    scoring config's JSON, then each state-dict entry's name and bytes, floating-point ones rounded to bfloat16. The
    copy made for hashing beside the encoding (`_BackgroundFingerprint`) gives the same hash."""
    import hashlib

    from modeling_m3el.index_m3el import _BackgroundFingerprint, _scoring_config

    model = _model(processor, "bidirectional")
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(_scoring_config(model.config.to_dict()), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if tensor.is_floating_point():
            tensor = tensor.to(torch.bfloat16).view(torch.int16)
        digest.update(tensor.cpu().contiguous().numpy().tobytes())  # (other buffers as they are)
    background = _BackgroundFingerprint(model).result()
    assert model_fingerprint(model) == digest.hexdigest() == background["fingerprint"]
    assert background["float16_fingerprint"] == model_fingerprint(model, torch.float16) != digest.hexdigest()
    assert model_fingerprint(model.to(torch.bfloat16)) == digest.hexdigest()


def test_the_same_weights_in_float16_are_the_same_model(processor, kb, mentions, tmp_path):
    """A weight rounded to float16 and then to bfloat16 is not always the weight rounded to bfloat16, so a model
    loaded in float16 has another bfloat16-rounded fingerprint: the index keeps the float16-rounded one as well."""
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, kb, progress=False)
    index.save(tmp_path)
    half = _model(processor, "bidirectional").to(torch.float16)
    assert model_fingerprint(half) != index.fingerprint  # why a second fingerprint is needed
    assert model_fingerprint(half, torch.float16) == index.float16_fingerprint
    for same in (half, _model(processor, "bidirectional").to(torch.bfloat16), model):
        index.check_model(same)
        loaded = EntityIndex.load(tmp_path, same)
        assert (loaded.fingerprint, loaded.float16_fingerprint) == (index.fingerprint, index.float16_fingerprint)
    # kept through to, select, concat and save/load
    for derived in (index.to(dtype=torch.float16), index.select(["Q3", "Q1"]),
                    EntityIndex.concat([index.select(["Q0"]), index.select(["Q1"])]), EntityIndex.load(tmp_path)):
        assert derived.float16_fingerprint == index.float16_fingerprint
    # an index built from the float16 model serves it and the float32 model (not the bfloat16 one: other roundings)
    from_half = EntityIndex.build(half, processor, kb, progress=False)
    from_half.check_model(half)
    from_half.check_model(model)
    # another model, in float16 too, is refused
    other = _model(processor, "bidirectional", seed=1).to(torch.float16)
    with pytest.raises(StaleIndexError, match="built with another model"):
        index.check_model(other)
    with pytest.raises(StaleIndexError, match="built with another model"):
        EntityIndex.load(tmp_path, other)


def test_an_index_saved_without_a_float16_fingerprint_says_what_to_do(processor, kb, tmp_path):
    model = _model(processor, "text_to_image")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    meta = json.loads((tmp_path / INDEX_META).read_text())
    del meta["float16_fingerprint"]  # as indexes saved before it was kept
    (tmp_path / INDEX_META).write_text(json.dumps(meta))
    assert EntityIndex.load(tmp_path, model).float16_fingerprint is None
    EntityIndex.load(tmp_path, model.to(torch.bfloat16))
    with pytest.raises(StaleIndexError, match="load the model in float32 or bfloat16, or rebuild the index"):
        EntityIndex.load(tmp_path, _model(processor, "text_to_image").to(torch.float16))


def test_half_written_index_is_refused(processor, kb, tmp_path):
    model = _model(processor, "text_to_image")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    meta = json.loads((tmp_path / INDEX_META).read_text())
    meta["fingerprint"] = "0" * 32  # as if the weights of one build met the metadata of another
    (tmp_path / INDEX_META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="different builds"):
        EntityIndex.load(tmp_path)


def test_weights_of_one_save_with_the_ids_of_another_are_refused(processor, kb, tmp_path):
    """The same model re-saves the index of an edited KB: a crash after the weights' rename, before the ids', leaves
    the new weights beside the old ids. Their fingerprints agree (one model): the save's identifier, stamped on both
    files, tells them apart."""
    from safetensors import safe_open

    model = _model(processor, "text_to_image")
    old, new = tmp_path / "old", tmp_path / "new"
    index = EntityIndex.build(model, processor, kb, progress=False)
    assert index.save_id is None
    index.save(old)
    meta = json.loads((old / INDEX_META).read_text())
    with safe_open(str(old / INDEX_WEIGHTS), framework="pt") as f:
        stamp = f.metadata()
    assert len(meta["save_id"]) == 32 and stamp == {"fingerprint": index.fingerprint, "save_id": meta["save_id"],
                                                    "content_id": index.content_id}
    assert index.save_id == meta["save_id"] == EntityIndex.load(old).save_id
    edited = EntityIndex.build(model, processor, kb[::-1], progress=False)  # the same entities, another order
    edited.save(new)
    assert edited.save_id != index.save_id and edited.fingerprint == index.fingerprint
    (old / INDEX_WEIGHTS).write_bytes((new / INDEX_WEIGHTS).read_bytes())  # the crash: new weights, old ids
    with pytest.raises(ValueError, match="come from different builds"):
        EntityIndex.load(old, model)
    # a save of the same index again gets a new identifier
    index.save(old)
    first = index.save_id
    index.save(old)
    assert index.save_id != first and EntityIndex.load(old, model).save_id == index.save_id


def test_an_index_saved_before_the_save_id_still_loads(processor, kb, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(processor, "text_to_image")
    index = EntityIndex.build(model, processor, kb, progress=False)
    index.save(tmp_path)
    meta = json.loads((tmp_path / INDEX_META).read_text())
    del meta["save_id"], meta["content_id"]  # as indexes saved before they were kept: only the fingerprint in both
    (tmp_path / INDEX_META).write_text(json.dumps(meta))
    tensors = load_file(tmp_path / INDEX_WEIGHTS)
    save_file(tensors, tmp_path / INDEX_WEIGHTS, metadata={"fingerprint": index.fingerprint})
    loaded = EntityIndex.load(tmp_path, model)
    assert loaded.save_id is None and loaded.entity_ids == index.entity_ids
    # its content id: derived from what the files hold, the same at every load (what a retriever saved with it needs)
    assert loaded.content_id.startswith("legacy-") and EntityIndex.load(tmp_path).content_id == loaded.content_id
    for name, tensor in index.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor), name
    # new-format weights beside old-format metadata (or the other way round): refused
    index.save(tmp_path / "new")
    (tmp_path / INDEX_WEIGHTS).write_bytes((tmp_path / "new" / INDEX_WEIGHTS).read_bytes())
    with pytest.raises(ValueError, match="come from different builds"):
        EntityIndex.load(tmp_path)



def _stamps(folder):
    from safetensors import safe_open

    with safe_open(str(folder / INDEX_WEIGHTS), framework="pt") as f:
        return json.loads((folder / INDEX_META).read_text()), f.metadata()


def test_the_content_id_names_the_encoding_and_survives_saves_and_casts(processor, kb, tmp_path):
    """A save makes a new save id and keeps the content id (in both files); load, `to` and the constructor given the
    index's very tensors keep it; new tensors (an encoding, even of the same KB with the same model; a subset; a
    union; copies) get a new one."""
    model = _model(processor, "text_to_image")
    index = EntityIndex.build(model, processor, kb, progress=False)
    assert len(index.content_id) == 32 and index.save_id is None
    index.save(tmp_path / "a")
    meta, stamp = _stamps(tmp_path / "a")
    assert meta["content_id"] == stamp["content_id"] == index.content_id != index.save_id == meta["save_id"]
    loaded = EntityIndex.load(tmp_path / "a", model)
    loaded.save(tmp_path / "b")  # loaded and saved again, elsewhere
    again = EntityIndex.load(tmp_path / "b", model)
    assert again.save_id == loaded.save_id != index.save_id
    loaded.save(tmp_path / "a")  # and in place
    assert EntityIndex.load(tmp_path / "a").save_id == loaded.save_id != index.save_id
    half = EntityIndex.load(tmp_path / "b", model, dtype=torch.float16)
    # the pipeline's re-stamp: the same tensors with other fingerprints, and their content id
    restamped = EntityIndex(half.tensors, half.entity_ids, "0" * 32, "1" * 32, content_id=half.content_id)
    same = [loaded, again, EntityIndex.load(tmp_path / "a"), half, half.to(dtype=torch.float32),
            index.to(device="cpu"), restamped, index.select(index.entity_ids), EntityIndex.concat([index])]
    for position, derived in enumerate(same):
        assert derived.content_id == index.content_id, position
    assert restamped.dtype == torch.float16 and restamped.fingerprint == "0" * 32
    rebuilt = EntityIndex.build(model, processor, kb, progress=False)  # the same KB, the same model: equal tensors
    for name, tensor in index.tensors.items():
        assert torch.equal(rebuilt.tensors[name], tensor), name
    new = [rebuilt, index.select(index.entity_ids[::-1]), index.select(index.entity_ids[:5]),
           EntityIndex.concat([index.select(index.entity_ids[:5]), index.select(index.entity_ids[5:])]),
           EntityIndex(dict(index.tensors), index.entity_ids, index.fingerprint),  # (without content_id: a new one)
           EntityIndex.from_inputs(model, processor.process_entities(
               [e["name"] for e in kb], [e["description"] for e in kb], [e["image"] for e in kb]), index.entity_ids)]
    ids = [derived.content_id for derived in new]
    assert index.content_id not in ids and len(set(ids)) == len(ids)


def test_content_ids_of_two_saves_mixed_are_refused(processor, kb, tmp_path):
    """The content id is compared across the two files too: the per-save check is as strong as before, and more."""
    model = _model(processor, "text_to_image")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    meta = json.loads((tmp_path / INDEX_META).read_text())
    (tmp_path / INDEX_META).write_text(json.dumps(dict(meta, content_id="0" * 32)))
    with pytest.raises(ValueError, match="come from different builds"):
        EntityIndex.load(tmp_path)
    (tmp_path / INDEX_META).write_text(json.dumps({k: v for k, v in meta.items() if k != "content_id"}))
    with pytest.raises(ValueError, match="come from different builds"):
        EntityIndex.load(tmp_path)


def test_an_index_saved_before_the_content_id_keeps_its_save_id_as_content_id(processor, kb, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model(processor, "text_to_image")
    index = EntityIndex.build(model, processor, kb, progress=False)
    index.save(tmp_path / "old")
    meta, stamp = _stamps(tmp_path / "old")
    del meta["content_id"], stamp["content_id"]  # the files as the code before the content id wrote them
    (tmp_path / "old" / INDEX_META).write_text(json.dumps(meta))
    save_file(load_file(tmp_path / "old" / INDEX_WEIGHTS), tmp_path / "old" / INDEX_WEIGHTS, metadata=stamp)
    loaded = EntityIndex.load(tmp_path / "old", model)
    assert loaded.content_id == loaded.save_id == meta["save_id"]
    loaded.save(tmp_path / "new")  # saved again by this code: the content id written, a new save id
    meta_new, stamp_new = _stamps(tmp_path / "new")
    assert meta_new["content_id"] == stamp_new["content_id"] == meta["save_id"] != meta_new["save_id"]
    assert EntityIndex.load(tmp_path / "new").content_id == meta["save_id"]


def test_processes_building_one_index_share_its_content_id():
    """`build` with several processes: every process holds the whole index, under the content id process 0 drew."""
    from modeling_m3el.index_m3el import _shared_content_id

    class Process:  # what `_shared_content_id` uses of an Accelerator; process 1 runs after process 0 here
        drawn = {}

        def __init__(self, rank):
            self.rank, self.device = rank, torch.device("cpu")

        def gather(self, tensor):
            Process.drawn[self.rank] = tensor
            return torch.cat([Process.drawn.get(rank, torch.zeros_like(tensor)) for rank in (0, 1)])

    first, second = _shared_content_id(Process(0)), _shared_content_id(Process(1))
    assert first == second and len(first) == 32 and first != _shared_content_id(Process(0))

def test_damaged_index_files_are_one_line_errors(processor, kb, tmp_path):
    model = _model(processor, "text_to_image")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    weights = (tmp_path / INDEX_WEIGHTS).read_bytes()
    (tmp_path / INDEX_WEIGHTS).write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(ValueError, match=r"entity_index.safetensors: cannot be read \(.*\); rebuild") as caught:
        EntityIndex.load(tmp_path, model)
    assert "\n" not in str(caught.value)
    (tmp_path / INDEX_META).write_text('{"format": 1, "fingerp')
    with pytest.raises(ValueError, match="entity_index.json: not valid JSON"):
        EntityIndex.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no entity index at .*absent: no such folder"):
        EntityIndex.load(tmp_path / "absent")


def test_a_killed_save_leaves_no_temporary_folder_for_ever(processor, kb, tmp_path):
    """A save killed midway leaves its temporary folder (a full index); the next save into the folder removes it once
    nothing in it changed for an hour, and leaves a recent one (a save running beside it) alone."""
    import os
    import time

    from modeling_m3el.index_m3el import STALE_SAVE_SECONDS

    model = _model(processor, "text_to_image")
    stale, running = tmp_path / ".entity_index.killed", tmp_path / ".entity_index.running"
    for folder in (stale, running):
        folder.mkdir()
        (folder / INDEX_WEIGHTS).write_bytes(b"x" * 1000)
    past = time.time() - STALE_SAVE_SECONDS - 60
    for path in (stale / INDEX_WEIGHTS, stale):
        os.utime(path, (past, past))
    (tmp_path / ".entity_index.json.notes").write_text("a file, not a save's folder: kept")
    EntityIndex.build(model, processor, kb, progress=False).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".entity_index.json.notes", ".entity_index.running", INDEX_META, INDEX_WEIGHTS,
    ]
    # a folder whose file was written recently is a save still running, even if the folder itself is old
    os.utime(running, (past, past))
    EntityIndex.load(tmp_path).save(tmp_path)
    assert running.exists()


def test_entity_ids_are_strings_however_given(processor, kb, mentions):
    """`build` and `from_inputs` made ids strings, `from_features` kept ints: an int id given to `rank` after `build`
    was not found, and a KB's index with ids "0", "1" concatenated with one of ids 0, 1 held both undetected."""
    model = _model(processor, "text_to_image")
    numbered = [dict(entity, id=i) for i, entity in enumerate(kb)]
    built = EntityIndex.build(model, processor, numbered, progress=False)
    assert built.entity_ids == [str(i) for i in range(13)]
    with torch.no_grad():
        features = model.encode(**mentions)
    expected = built.rank(model, features, ["3", "0", "12"])
    assert torch.equal(built.rank(model, features, [3, 0, np.int64(12)]), expected)
    scores = built.scores(model, features)
    assert expected.tolist() == [int((scores[row] >= scores[row, gold]).sum()) for row, gold in enumerate([3, 0, 12])]
    assert built.positions([5, "6"]).tolist() == [5, 6] and built.select([2, 1]).entity_ids == ["2", "1"]
    encoded = model.encode(**processor.process_entities([e["name"] for e in kb[:3]],
                                                         [e["description"] for e in kb[:3]],
                                                         [e["image"] for e in kb[:3]]), side="entity")
    from_features = EntityIndex.from_features(model, encoded, [0, 1, 2])
    assert from_features.entity_ids == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"duplicate entity ids in the index: \['0', '1', '2'\]"):
        EntityIndex.concat([built, from_features])
    with pytest.raises(KeyError, match="entity id '99' is not in the index"):
        built.rank(model, features, [3, 0, 99])


def test_empty_inputs_have_clear_errors(processor, kb, mentions):
    model = _model(processor, "text_to_image")
    with pytest.raises(ValueError, match="empty KB"):
        EntityIndex.build(model, processor, [], progress=False)
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    empty = type(features)(**{k: v[:0] for k, v in features.items()})
    with pytest.raises(ValueError, match="a batch of 0"):
        index.scores(model, empty)
    with pytest.raises(KeyError, match="'Q99' is not in the index"):
        index.rank(model, features, ["Q1", "Q2", "Q99"])
    with pytest.raises(ValueError, match="k must be positive"):
        index.topk(model, features, k=0)
    with pytest.raises(ValueError, match="duplicate entity ids"):
        EntityIndex.build(model, processor, kb + kb[:1], progress=False)


def test_an_index_on_another_device_than_the_model_is_refused(processor, kb, mentions):
    """Scoring needs the model's matching weights beside the index's tensors: an index on another device than the
    model (here PyTorch's "meta" device, as a GPU would be) is refused with a message that names both and the fix,
    by every call that scores, before any work."""
    model = _model(processor, "text_to_image")
    index = EntityIndex.build(model, processor, kb, progress=False)
    elsewhere = index.to(device="meta")
    with torch.no_grad():
        features = model.encode(**mentions)
    gold = [e["id"] for e in kb[:len(features.text_embeds)]]
    message = "the entity index is on meta and the model on cpu: move one to the other's device"
    calls = {
        "scores": lambda: elsewhere.scores(model, features),
        "rank": lambda: elsewhere.rank(model, features, gold),
        "rank, every pair": lambda: elsewhere.rank(model, features, gold, prune=False),
        "topk": lambda: elsewhere.topk(model, features, k=2),
        "score_candidates": lambda: elsewhere.score_candidates(model, features, torch.zeros(len(gold), 1).long()),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=message):
            call()


def test_bfloat16_index_ranks_close_to_float32(processor, kb, mentions):
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    exact = index.scores(model, features)
    half = index.to(dtype=torch.bfloat16)
    fast = half.scores(model, features)
    # bfloat16 tensors, float32 scores (the products of the attention are the tensors' own precision)
    assert half.dtype == torch.bfloat16 and fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=0, atol=0.1)  # scores of 11-15: the tensors' rounding alone


def test_float16_index_refuses_values_beyond_its_range(processor, kb, mentions):
    """float16 ends at 65504: an index cast to float16 whose values overflow is refused, naming the tensor and the
    entities; within range the float16 index ranks as float32 does, its scores within the tensors' rounding."""
    model = _model(processor, "bidirectional")
    index = EntityIndex.build(model, processor, kb, progress=False)
    with torch.no_grad():
        features = model.encode(**mentions)
    half = index.to(dtype=torch.float16)
    torch.testing.assert_close(half.scores(model, features), index.scores(model, features), rtol=0, atol=0.02)
    name = next(iter(index.tensors))
    tensors = dict(index.tensors)
    tensors[name] = tensors[name].clone()
    tensors[name][1] = 1e5  # entity 1 only
    too_large = EntityIndex(tensors, index.entity_ids, index.fingerprint, index.float16_fingerprint)
    assert too_large.to(dtype=torch.bfloat16).dtype == torch.bfloat16  # bfloat16 has float32's range
    with pytest.raises(ValueError, match=rf"index tensor {re.escape(name)} holds \d+ infinite value\(s\) in float16, "
                       rf"in 1 of {len(index)} entities \(the first: \[{re.escape(repr(index.entity_ids[1]))}\]\).*65504.*bfloat16"):
        too_large.to(dtype=torch.float16)


def test_building_holds_the_index_once_not_its_batches_and_their_concatenation(processor):
    """The index's tensors are allocated once at their full size and filled batch by batch: a build's peak of CPU
    allocations is the index plus one batch's work, not twice the index (what concatenating the batches took); and
    the index equals one built in a single batch."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        from common import cpu_allocation_peak, random_features
    finally:
        sys.path.pop(0)
    model = _model(processor, "text_to_image")
    features = random_features(model.config, 3000, "cpu", torch.Generator().manual_seed(0))
    ids = [f"E{i}" for i in range(3000)]
    built = {}
    peak = cpu_allocation_peak(lambda: built.update(index=EntityIndex.from_features(model, features, ids,
                                                                                     batch_size=100)))
    index, whole = built["index"], EntityIndex.from_features(model, features, ids)
    assert index.tensors.keys() == whole.tensors.keys()
    for name, tensor in whole.tensors.items():
        torch.testing.assert_close(index.tensors[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    assert peak is not None and index.nbytes <= peak < 1.3 * index.nbytes, (peak, index.nbytes)


def test_progress_bars_name_their_unit_and_say_when_they_count_one_process_share():
    """Index builds count entities and rankings mentions (the units speeds are quoted in); with several processes
    the first one's bar counts its own share, and its label says so."""
    from modeling_m3el.index_m3el import _entity_bar, share_bar

    bars = [_entity_bar(7), _entity_bar(4, world=2), share_bar("Ranking", "mention", 5, world=3)]
    try:
        assert [(bar.desc, bar.unit, bar.total) for bar in bars] == [
            ("Indexing entities", "entity", 7), ("Indexing entities (process 1 of 2: its share)", "entity", 4),
            ("Ranking (process 1 of 3: its share)", "mention", 5)]
    finally:
        for bar in bars:
            bar.close()
