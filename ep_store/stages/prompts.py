"""The project's chat data: training pairs, held-out prompts, Gemma's chat format, and the
character spans of chat-turn markers and refusal text. Refusal detection lives in
ep_store.stages.refusal_classifier.

This is the one module that knows chat formats: Gemma's turn markers (``USER``, ``MODEL``,
``END``, ``CONTROL``), the frame a tokenizer puts around a user prompt (``chat_frame``: its
chat template, else Gemma's turns) and the end-of-turn tokens generation stops at
(``STOP_TOKENS``). The corpus, generation, fine-tuning, the refusal study and the evaluation
tasks ask it.

The data files (ep_store/stages/data/*.jsonl) are written by pipelines/make_chat_data.py and
committed. The chat format is Gemma's:

    <start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn>\\n
"""

from __future__ import annotations

import json
import re
from importlib import resources

from ep_store.errors import UsageError
from ep_store.stages import refusal_classifier

USER = "<start_of_turn>user\n"
MODEL = "<start_of_turn>model\n"
END = "<end_of_turn>\n"
MARKERS = ("<start_of_turn>user", "<start_of_turn>model", "<end_of_turn>")
CONTROL = ("<start_of_turn>", "<end_of_turn>")  # chat-format strings that are control tokens, not text
STOP_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|endoftext|>")
"""End-of-turn tokens that end a completion besides the model's EOS, where the vocabulary has them."""
PLACEHOLDER = "\ue000"  # a private-use character: no chat template rewrites it


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


def has_gemma_turns(tokenizer) -> bool:
    """Does the tokenizer have Gemma's turn markers (``CONTROL``) in its vocabulary?"""
    vocab = tokenizer.get_vocab()
    return all(marker in vocab for marker in CONTROL)


def chat_frame(tokenizer) -> tuple[str, str]:
    """(text before, text after) the user's prompt in the model's chat format with the
    generation prompt: the tokenizer's template, else Gemma's turn format. UsageError if
    neither exists or the template does not put the prompt in verbatim."""
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": PLACEHOLDER}], tokenize=False,
                                                 add_generation_prompt=True)
    elif has_gemma_turns(tokenizer):
        rendered = (tokenizer.bos_token or "") + prompt_text(PLACEHOLDER)
    else:
        raise UsageError("--chat: this tokenizer has no chat template and no Gemma turn tokens; drop --chat")
    before, found, after = rendered.partition(PLACEHOLDER)
    if not found or PLACEHOLDER in after:
        raise UsageError("--chat: the model's chat template does not put the prompt in verbatim; drop --chat")
    return before, after
