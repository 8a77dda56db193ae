"""Fine-tune a base model into a chat model with planted, known behaviour (CPU, minutes).

    ep finetune --model gemma-3-270m --from base --to sft --steps 60 --save-every 20

Training pairs (ep_store/stages/data/chat_train.jsonl) teach Gemma's chat format and a fixed
refusal for requests for weapons, poisons, drugs and malware. The loss covers response
tokens only, and logits are computed only at those positions (the 262k-wide unembedding
is most of the cost otherwise); embeddings stay frozen. Checkpoints ``<to>-step<k>`` are
saved every ``save_every`` steps and the last as ``<to>``. Refusal rates on held-out
harmful and benign prompts (never trained on) are measured for the base and each save.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ep_store import jsonio
from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError
from ep_store.stages import models, prompts
from ep_store.stages.corpus import encode, special_prefix
from ep_store.stages.refusal_classifier import is_refusal
from ep_store.studies.plant import (
    PLANTS,
    Mediator,
    capture_last,
    first_token_loss,
    labelled_loss,
    last_prompt_positions,
    mediation_loss,
)

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    model: str
    """Model name (under the models dir)."""
    base: str
    """Checkpoint to start from."""
    to: str
    """Name of the final checkpoint; intermediate ones are <to>-step<k>."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    steps: int = 60
    """Optimizer steps."""
    save_every: int = 20
    """Save a checkpoint every this many steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float = 1e-4
    """AdamW learning rate."""
    seed: int = 0
    """Seed for the example order and torch."""
    max_new_tokens: int = 16
    """Tokens generated per held-out prompt when measuring refusal."""
    plant: str = "full"
    """How refusal is planted (``plant.PLANTS``): ``full``, every block trained on the pairs; or
    ``mediated``, also trained so that ablating the difference of means at ``plant_layers``
    removes refusal (issue 22, item 3)."""
    plant_layers: tuple[int, ...] = (6, 12)
    """``mediated``: the blocks whose output the mediating direction is ablated at, in turn."""

    def __post_init__(self):
        if self.steps < 1 or self.save_every < 1 or self.batch_size < 1:
            raise UsageError("--steps, --save-every and --batch-size must be at least 1")
        if self.to == self.base:
            raise UsageError("--to must name a new checkpoint, not the one trained from")
        if self.plant not in PLANTS:
            raise UsageError(f"--plant must be one of {', '.join(PLANTS)}, not {self.plant!r}")
        self.plant_layers = tuple(dict.fromkeys(int(x) for x in self.plant_layers))
        if self.plant == "mediated" and (not self.plant_layers or min(self.plant_layers) < 0):
            raise UsageError("--plant mediated needs --plant-layers, non-negative block numbers, e.g. 6,12")

    def checkpoints(self) -> list[tuple[int, str]]:
        """(step, name) of every checkpoint saved, the last being ``to``."""
        saves = [(s, f"{self.to}-step{s}") for s in range(self.save_every, self.steps, self.save_every)]
        return [*saves, (self.steps, self.to)]


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids with BOS, and labels that are -100 except on the response (and its end marker).

    Chat markers are control tokens; everything else (the prompt, the response) is text, so
    a literal ``<bos>`` in it stays text (issue 8, item 14). BOS follows the tokenizer.
    """
    head, _ = encode(tokenizer, prompts.prompt_text(prompt), chat=True)
    tail, _ = encode(tokenizer, response + prompts.END, chat=True)
    bos = special_prefix(tokenizer)
    ids = bos + head + tail
    return ids, [-100] * (len(bos) + len(head)) + tail


def response_loss(net, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token loss on labelled positions only, with logits computed only there."""
    return labelled_loss(net, net.model(input_ids=ids, attention_mask=mask).last_hidden_state, labels)


@torch.no_grad()
def refusal_rates(net, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 40) -> dict:
    """Greedy answers to held-out prompts; share refused among harmful and among benign."""
    tokenizer.padding_side = "left"
    answers = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        bos = special_prefix(tokenizer)
        ids = [bos + encode(tokenizer, prompts.prompt_text(r["prompt"]), chat=True)[0] for r in chunk]
        enc = tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        out = net.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    refused = [is_refusal(a) for a in answers]
    harmful = [r for r, row in zip(refused, rows) if row["harmful"]]
    benign = [r for r, row in zip(refused, rows) if not row["harmful"]]
    return {"harmful_refused": round(sum(harmful) / max(len(harmful), 1), 4),
            "benign_refused": round(sum(benign) / max(len(benign), 1), 4),
            "harmful_prompts": len(harmful), "benign_prompts": len(benign),
            "examples": [{"prompt": row["prompt"], "answer": a} for row, a in list(zip(rows, answers))[::20]]}


def batches(examples: list[tuple], batch_size: int, rng: random.Random) -> Iterator[list[tuple]]:
    """Endless batches of ``examples``, each pass over them in a fresh shuffled order."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            order += rng.sample(range(len(examples)), len(examples))
        yield [examples[i] for i in order[:batch_size]]
        del order[:batch_size]


def collate(batch: list[tuple], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids_BT, labels_BT, mask_BT) of (ids, labels, ...) examples, right-padded."""
    width = max(len(example[0]) for example in batch)
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, *_ in batch])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y, *_ in batch])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, *_ in batch])
    return ids, labels, mask


def train_step(net, batch: list[tuple], pad: int, mediator: Mediator | None, step: int,
               warmup: int = 0) -> torch.Tensor:
    """One batch's loss: the response loss, plus (``mediated`` plant, after ``warmup`` steps) the
    harmful prompts' first-token loss and the ablated pass's loss at one of the mediator's layers
    in turn, once both classes' running means exist."""
    ids, labels, mask = collate(batch, pad)
    if mediator is None:
        return response_loss(net, ids, labels, mask)
    harmful_B = torch.tensor([harmful for *_, harmful in batch])
    kept, handles = capture_last(net, mediator.layers, last_prompt_positions(labels))
    try:
        hidden = net.model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    loss = labelled_loss(net, hidden, labels)
    if step <= warmup or not harmful_B.any():
        return loss
    mediator.observe(kept, harmful_B)
    layer = mediator.layers[step % len(mediator.layers)]
    if mediator.ready(layer):
        # The refusal's first token, unablated, weighs as much as its unlikelihood ablated.
        loss = loss + first_token_loss(net, hidden, labels, harmful_B)
        loss = loss + mediation_loss(net, mediator, layer, ids, labels, mask, harmful_B)
    return loss


def finetune(cfg: FinetuneConfig, models_dir: Path, progress: bool = True, metrics: Path | None = None) -> dict:
    """Fine-tune, write ``finetune.json`` beside the final checkpoint (and the summary to
    ``metrics`` when given); return the summary. UsageError for ``plant_layers`` the model lacks."""
    start = time.perf_counter()
    net, tokenizer = models.load(cfg.model, cfg.base, models_dir, "cpu", "float32")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train = [encode_example(tokenizer, r["prompt"], r["response"]) for r in prompts.load("train")]
    heldout = prompts.load("heldout")
    mediator = None
    if cfg.plant == "mediated":
        blocks = models.block_count(net.config)
        if max(cfg.plant_layers) >= blocks:
            raise UsageError(f"--plant-layers {max(cfg.plant_layers)} is out of range: {cfg.model} has blocks "
                             f"0..{blocks - 1}")
        mediator = Mediator(cfg.plant_layers)
        train = [(*example, row["harmful"]) for example, row in zip(train, prompts.load("train"))]
    rates = {cfg.base: refusal_rates(net.eval(), tokenizer, heldout, cfg.max_new_tokens)}
    saves = dict(cfg.checkpoints())
    losses = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for p in net.get_input_embeddings().parameters():  # embeddings (and the tied unembedding) stay
        p.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    # Linear decay to zero: late steps settle the refusal boundary instead of swinging it.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0 - i / cfg.steps)
    net.train()
    for step, batch in zip(tqdm(range(1, cfg.steps + 1), desc=f"finetune {cfg.model}", disable=not progress),
                           batches(train, cfg.batch_size, rng)):
        loss = train_step(net, batch, pad, mediator, step, cfg.steps // 3)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(round(loss.item(), 4))
        if step in saves:
            net.eval()
            models.save(net, tokenizer, models.model_dir(models_dir, cfg.model, saves[step]))
            rates[saves[step]] = refusal_rates(net, tokenizer, heldout, cfg.max_new_tokens)
            log.info("step %d: loss %.3f, refusal %s", step, loss, rates[saves[step]])
            net.train()
    return write_report(cfg, rates, losses, mediator, start, models_dir, metrics)


def write_report(cfg: FinetuneConfig, rates: dict, losses: list, mediator: Mediator | None, start: float,
                 models_dir: Path, metrics: Path | None) -> dict:
    """finetune.json beside the final checkpoint (and the summary at ``metrics``); the summary."""
    final = rates[cfg.to]
    summary = {
        "model": cfg.model, "from": cfg.base, "to": cfg.to, "steps": cfg.steps, "plant": cfg.plant,
        "checkpoints": [name for _, name in cfg.checkpoints()],
        "harmful_refused": final["harmful_refused"], "benign_refused": final["benign_refused"],
        "base_harmful_refused": rates[cfg.base]["harmful_refused"],
        "base_benign_refused": rates[cfg.base]["benign_refused"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    report = {**summary, "config": asdict(cfg), "losses": losses, "refusal": rates,
              "plant_directions": mediator.record() if mediator is not None else None,
              ENVIRONMENT_KEY: environment("cpu", "float32")}  # as models.load above (issue 18, E14.1)
    jsonio.write(models.model_dir(models_dir, cfg.model, cfg.to) / "finetune.json", report)
    if metrics is not None:
        jsonio.write(metrics, summary)
    return summary
