"""Which protocol made an evaluation: ours, or the paper's as its benchmarks publish it (issue 22).

Every ``ep eval probe`` / ``ep eval concepts`` run names a protocol (``--protocol``) and records
it, with the settings it implies, in its metrics.json and its DVC metrics file:

- ``ours`` (default; issue 10): sparse probes standardise features, draw negatives from all other
  classes at random and divide EP accuracy by the all-D raw probe (retention); concept detection
  scores a text by the max of the centered cosine u.e over its first tokens, plain text.
- ``paper``: as SAEBench and AxBench published them and the EP paper ran them (DESIGN.md, "The
  paper's protocols"): ``ep_store.evaluate.saebench`` and ``ep_store.evaluate.axbench``.

This module imports nothing heavy: the CLI reads its registries for its choices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ep_store.errors import UsageError

PROTOCOLS = ("ours", "paper")
"""Names of the protocols, in the CLI's order."""

CHAT_ROLES = ("none", "user", "model")
"""How ``ep eval concepts --chat`` frames a text: plain, as the user's turn, or as the model's turn."""


@dataclass(frozen=True)
class ProbeProtocol:
    """What a sparse-probing protocol implies (``ProbeConfig.protocol``)."""

    scaler: bool
    """Standardise each feature on the train split before the logistic regression."""
    negatives: str
    """``pooled``: negatives drawn at random from all other classes; ``even``: spread evenly
    over the other classes, each class split train/test first (SAEBench ``prepare_probe_data``)."""
    retention: bool
    """Report retention_<name> = accuracy / all-D raw accuracy (SAEBench computes none)."""
    mean_basis: bool
    """Add ``ep_onehot_mean``: the one-hot of the nearest mean-member direction (the paper's
    second basis), where the dictionary stores mean directions."""
    max_tokens_per_text: int
    """Tokens kept per text unless ``--max-tokens-per-text`` says otherwise."""
    source: str


@dataclass(frozen=True)
class ConceptProtocol:
    """What a concept-detection protocol implies (``ConceptConfig.protocol``)."""

    score: str
    """``cosine``: a token scores u.e (centered, unit); ``raw``: x.e, the raw residual's
    projection (AxBench's probe with that direction and bias 0: magnitude counts)."""
    bases: tuple[str, ...]
    """Directions a region offers: ``exemplar`` and, where stored, ``mean`` (mean-member direction)."""
    chat: str
    """Default of ``ConceptConfig.chat`` (one of CHAT_ROLES)."""
    max_tokens_per_text: int
    """Text tokens kept per text (the chat template's come on top) unless the run says otherwise."""
    source: str


PROBE = {
    "ours": ProbeProtocol(scaler=True, negatives="pooled", retention=True, mean_basis=False, max_tokens_per_text=64,
                          source="issue 10: SAEBench-style, standardised, retention over the all-D raw probe"),
    "paper": ProbeProtocol(scaler=False, negatives="even", retention=False, mean_basis=True, max_tokens_per_text=128,
                           source="SAEBench sparse_probing (Karvonen et al. 2025): context_length 128, plain "
                                  "L2 LogisticRegression, top-k by |mean_pos - mean_neg|, raw top-k = identity SAE"),
}
CONCEPT = {
    "ours": ConceptProtocol(score="cosine", bases=("exemplar",), chat="none", max_tokens_per_text=64,
                            source="issue 10: max centered cosine per text"),
    "paper": ConceptProtocol(score="raw", bases=("exemplar", "mean"), chat="model", max_tokens_per_text=128,
                             source="AxBench latent detection (Wu et al. 2025): chat-formatted, template prefix "
                                    "excluded, max over tokens of x.w with bias 0; output_length 128"),
}


def check(name: str) -> str:
    """``name`` if it is a protocol, else UsageError listing them."""
    if name not in PROTOCOLS:
        raise UsageError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}")
    return name


def check_chat(role: str) -> str:
    """``role`` if it is a chat framing, else UsageError listing them."""
    if role not in CHAT_ROLES:
        raise UsageError(f"unknown chat framing {role!r}; choose from {', '.join(CHAT_ROLES)}")
    return role


def mean_basis(dictionary):
    """The dictionary's mean-member directions, normalised (K, D) float32 torch tensor, the paper's
    "mean" basis (``Partition.mean_member_direction``); None where the exemplar table has none."""
    if "mean_direction" not in dictionary.table.column_names:
        return None
    import torch

    return torch.nn.functional.normalize(dictionary.mean_directions.to(torch.float32), dim=1)


def record(registry: dict, name: str, **effective) -> dict:
    """``{"protocol": name, "protocol_settings": {...}}`` for a metrics file: the registry's
    settings of ``name`` with the values this run actually used (``effective``) over them."""
    return {"protocol": name, "protocol_settings": {**asdict(registry[name]), **effective}}
