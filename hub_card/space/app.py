"""Gradio Space for an M3EL linker: a sentence, the mention in it and the image posted with it in; the KB's top-k
entities out, with their names, descriptions, images and score bars.

    M3EL_MODEL=user/m3el-wikimel python app.py      # a Hub repo, or a local folder built by `m3el export`

The model repo carries its code, its entity index and the KB's metadata, so this file is all the Space needs.
"""

import base64
import html
import json
import mimetypes
import os

import gradio as gr
import torch
from transformers import pipeline
from transformers.utils import cached_file

TASK = "multimodal-entity-linking"
MODEL = os.environ.get("M3EL_MODEL", "")  # set it in the Space's settings (Variables)
MAX_TOP_K = 10

CSS = """
.m3el-entity {display: flex; gap: 12px; align-items: center; padding: 8px 0; border-bottom: 1px solid #8883;}
.m3el-entity img, .m3el-entity .m3el-noimage {width: 72px; height: 72px; object-fit: cover; border-radius: 6px;
  flex: none; background: #8882;}
.m3el-entity .m3el-text {flex: 1; min-width: 0;}
.m3el-entity .m3el-name {font-weight: 600;}
.m3el-entity .m3el-id {opacity: .6; font-size: .85em; margin-left: .4em;}
.m3el-entity .m3el-description {font-size: .9em; opacity: .85;}
.m3el-bar {height: 8px; border-radius: 4px; background: #8883; margin-top: 4px;}
.m3el-bar > div {height: 100%; border-radius: 4px; background: #f97316;}
.m3el-score {font-size: .8em; opacity: .7;}
"""


def _image_source(path: str | None) -> str | None:
    """An <img> source for an entity image: URLs as they are, local files inlined (no file serving needed)."""
    if not path:
        return None
    if path.startswith(("http://", "https://")):
        return path
    if not os.path.isfile(path):
        return None
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def render(entities: list[dict]) -> str:
    """The ranked entities as HTML: image, name, id, description, and a bar of the probability over the KB."""
    rows = []
    for entity in entities:
        source = _image_source(entity.get("image"))
        picture = (f'<img src="{html.escape(source)}" alt="">' if source else '<div class="m3el-noimage"></div>')
        name = html.escape(entity.get("name") or entity["id"])
        rows.append(
            f'<div class="m3el-entity" data-rank="{entity["rank"]}" data-entity-id="{html.escape(entity["id"])}">'
            f"{picture}<div class=\"m3el-text\">"
            f'<div><span class="m3el-name">{entity["rank"]}. {name}</span>'
            f'<span class="m3el-id">{html.escape(entity["id"])}</span></div>'
            f'<div class="m3el-description">{html.escape(entity.get("description") or "")}</div>'
            f'<div class="m3el-bar"><div style="width: {100 * entity["probability"]:.1f}%"></div></div>'
            f'<div class="m3el-score">score {entity["score"]:.3f} · probability {entity["probability"]:.3f}</div>'
            "</div></div>"
        )
    return '<div class="m3el-results">' + "".join(rows) + "</div>"


def _examples(model: str) -> list[list[str]]:
    """[sentence, mention, image path] of the example mentions shipped with the model, if any."""
    path = cached_file(model, "examples.jsonl", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return []
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                example = json.loads(line)
                image = cached_file(model, example["image"], _raise_exceptions_for_missing_entries=False)
                examples.append([example["text"], example["mention"], image])
    return examples


def make_link(linker):
    """The app's callback: (sentence, mention, image path, top_k) -> HTML; a bad request raises a `gr.Error` that the
    app shows (a missing mention or sentence, an unreadable image)."""

    def link(sentence, mention, image, top_k):
        request = {"mention": mention or "", "text": sentence or "", "image": image}
        try:
            entities = linker(request, top_k=int(top_k))
        except ValueError as error:
            raise gr.Error(str(error).removeprefix("input 0: ")) from None
        return render(entities)

    return link


def build_demo(model: str, device=None) -> gr.Blocks:
    """The app for the linker in `model` (a Hub repo id or a local folder)."""
    if not model:
        raise ValueError("no model: set M3EL_MODEL to a Hub repo id or a folder built by `m3el export`")
    if device is None:
        device = 0 if torch.cuda.is_available() else -1
    linker = pipeline(TASK, model=model, trust_remote_code=True, device=device)
    link = make_link(linker)

    with gr.Blocks(title="M3EL multimodal entity linking") as demo:
        gr.Markdown(
            "# M3EL multimodal entity linking\n"
            "Give a sentence, the mention in it and the image posted with it: the model ranks the "
            f"{len(linker.index)} entities of its knowledge base. "
            "([paper](https://arxiv.org/abs/2412.10440))"
        )
        with gr.Row():
            with gr.Column():
                sentence = gr.Textbox(label="Sentence", lines=2, elem_id="sentence")
                mention = gr.Textbox(label="Mention (as it appears in the sentence)", elem_id="mention")
                image = gr.Image(label="Image posted with the sentence (optional)", type="filepath", image_mode=None,
                                 elem_id="image")
                top_k = gr.Slider(1, min(MAX_TOP_K, len(linker.index)), value=min(5, len(linker.index)), step=1,
                                  label="Entities to show", elem_id="top_k")
                button = gr.Button("Link", variant="primary", elem_id="link")
            with gr.Column():
                results = gr.HTML(label="Entities", elem_id="results")
        button.click(link, [sentence, mention, image, top_k], results, api_name="link")
        examples = _examples(model)
        if examples:
            gr.Examples(examples=examples, inputs=[sentence, mention, image], label="Examples from the test split")
    return demo


if __name__ == "__main__":
    build_demo(MODEL).launch(css=CSS)
