"""The project's chat data: training pairs, held-out prompts, Gemma's chat format, and the
character spans of chat-turn markers and refusal text. Refusal detection lives in
ep_store.stages.refusal_classifier.

The data files (ep_store/stages/data/*.jsonl) are written by pipelines/make_chat_data.py and
committed. The chat format is Gemma's:

    <start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn>\\n
"""

from __future__ import annotations

import json
import re
from importlib import resources

from ep_store.stages import refusal_classifier

USER = "<start_of_turn>user\n"
MODEL = "<start_of_turn>model\n"
END = "<end_of_turn>\n"
MARKERS = ("<start_of_turn>user", "<start_of_turn>model", "<end_of_turn>")
CONTROL = ("<start_of_turn>", "<end_of_turn>")  # chat-format strings that are control tokens, not text


def refusal_text() -> str:
    return refusal_classifier.planted_refusal()


def load(name: str) -> list[dict]:
    """'train' or 'heldout' rows: prompt, response, harmful."""
    text = resources.files("ep_store.stages.data").joinpath(f"chat_{name}.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompt_text(prompt: str) -> str:
    """What the model sees before it answers."""
    return f"{USER}{prompt}{END}{MODEL}"


def chat_text(prompt: str, response: str) -> str:
    return f"{prompt_text(prompt)}{response}{END}"


def chat_stream_texts():
    """The chat documents of the ``chat`` corpus source: held-out prompts with their
    target responses (refusal or answer), in Gemma's chat format."""
    for i, row in enumerate(load("heldout")):
        yield f"chat:{i}", chat_text(row["prompt"], row["response"])


def labelled_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, label) character spans: 'marker' for chat-turn markers, 'refusal' for refusal text."""
    spans = [(m.start(), m.end(), "marker") for m in re.finditer("|".join(map(re.escape, MARKERS)), text)]
    refusal = refusal_text()
    spans += [(m.start(), m.end(), "refusal") for m in re.finditer(re.escape(refusal), text)]
    return sorted(spans)
