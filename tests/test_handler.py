"""The Inference Endpoints handler shipped in the published folder: requests as an endpoint sends them, answers that
are plain JSON, and a clear `{"error": ...}` for every bad request."""

import base64
import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def handler(hub_folder):
    spec = importlib.util.spec_from_file_location("m3el_endpoint_handler", hub_folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(hub_folder))


@pytest.fixture(scope="module")
def request_body(hub_folder):
    example = json.loads((hub_folder / "examples.jsonl").read_text().splitlines()[0])
    image = base64.b64encode((hub_folder / example["image"]).read_bytes()).decode()
    return {"mention": example["mention"], "text": example["text"], "image": image}


def test_one_mention_and_a_list(handler, hub_folder, request_body):
    entities = handler({"inputs": request_body, "parameters": {"top_k": 3}})
    assert [e["rank"] for e in entities] == [1, 2, 3]
    json.dumps(entities)  # plain JSON
    # Entity images are paths in the model repo, not on the endpoint's disk.
    for entity in entities:
        assert entity["image"] is None or (not entity["image"].startswith("/") and (hub_folder / entity["image"]).is_file())
    # base64 as the `base64` command writes it (line breaks) and URL-safe base64 are read too
    raw = base64.b64decode(request_body["image"])
    for form in ("\n".join(request_body["image"][i : i + 76] for i in range(0, len(request_body["image"]), 76)),
                 base64.urlsafe_b64encode(raw).decode()):
        assert [e["id"] for e in handler({"inputs": {**request_body, "image": form}, "parameters": {"top_k": 3}})] == [
            e["id"] for e in entities]
    data_url = {**request_body, "image": "data:image/jpeg;base64," + request_body["image"]}
    batch = handler({"inputs": [request_body, data_url, {"mention": "Atlas", "text": "the Atlas"}]})
    assert len(batch) == 3 and all(len(entities) == 5 for entities in batch)  # the pipeline's default top_k
    assert [e["id"] for e in batch[0][:3]] == [e["id"] for e in entities] == [e["id"] for e in batch[1][:3]]
    # Among candidates: as the pipeline gives them.
    among = handler({"inputs": request_body, "parameters": {"top_k": 3, "candidates": 4}})
    expected = handler.linker({**request_body, "image": base64.b64decode(request_body["image"])}, top_k=3, candidates=4)
    assert [e["id"] for e in among] == [e["id"] for e in expected] and among[0]["id"] == entities[0]["id"]
    assert [e["probability"] for e in among] == pytest.approx([e["probability"] for e in expected])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inputs": {"mention": "Atlas"}}, "missing field 'text'"),
        ({"inputs": {"text": "the Atlas"}}, "missing field 'mention'"),
        ({"inputs": {"mention": "Atlas", "text": ""}}, "'text' is empty"),
        ({"inputs": [{"mention": "Atlas", "text": "the Atlas"}, {"mention": "Atlas", "text": " "}]}, "input 1: 'text'"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas", "image": "%%%"}}, "'image' is not base64"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas", "image": "/etc/hosts"}}, "'image' is not base64"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas", "image": base64.b64encode(b"not an image").decode()}},
         "unreadable image"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas", "image": 12}}, "'image' must be a base64 string"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas", "image": "data:,/etc/hosts"}}, "must be base64-encoded"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "parameters": {"top_k": 0}}, "top_k must be a positive"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "parameters": {"top_k": -2}}, "top_k must be a positive"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "parameters": {"k": 3}}, "unknown parameter"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "parameters": {"candidates": 0}},
         "candidates must be a positive integer"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "parameters": [3]}, "parameters must be an object"),
        ({"mention": "Atlas", "text": "the Atlas"}, "a request is"),
        ("Atlas", "a request is"),
        ({"inputs": "Atlas"}, "inputs must be a mention"),
        ({"inputs": []}, "no mentions to link"),
        ({"inputs": {"mention": "Atlas", "text": "the Atlas"}, "options": {}}, "unknown request field"),
    ],
)
def test_bad_requests_get_an_error_response(handler, data, message):
    response = handler(data)
    assert isinstance(response, dict) and set(response) == {"error"}, response
    assert message in response["error"]
    assert "Traceback" not in response["error"]
