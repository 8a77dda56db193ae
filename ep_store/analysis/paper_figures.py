"""The paper's figures that ``ep report paper`` compares ours with (issue 22, item 4): one registry,
each figure with its setting and where it was read.

The paper body was not available; every number comes from the authors' repository
(github.com/jessicarumbelow/exemplar-partitioning at d8abe22/0a62d79: README.md and the figure
scripts) or the Hugging Face dataset card of J-RUM/exemplar-partitioning. A claim whose paper gives
no number (``targets`` empty) gets the verdict "not published".

The verdict rule (``verdict``): every compared value of ours within ``tolerance`` of the paper's
figure: yes; some: partly; none: no; nothing measured: not measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BUILDS = "313,728 to 15,207,552 tokens streamed (HF dataset card of J-RUM/exemplar-partitioning)"
"""The token counts of the authors' published builds; which build a claim used is not stated."""

VERDICTS = ("yes", "partly", "no", "not measured", "not published")


@dataclass(frozen=True)
class Figure:
    """One claim of the paper and the number(s) it publishes."""

    title: str
    """The claim in a few words (the table's first column)."""
    figure: str
    """The published number(s) and their setting, as the table shows them."""
    model: str
    """The model the paper measured on."""
    layer: int
    """The paper's block."""
    percentile: float | None
    """The paper's dictionary percentile p; ours is compared at the nearest p we ran."""
    tokens: str
    """The paper's dictionary (or comparison) tokens."""
    source: str
    """Where the numbers were read."""
    targets: dict[str, float] = field(default_factory=dict)
    """The published values by name; empty when the paper gives none."""
    tolerance: float | None = None
    """Ours reproduces a target when within this of it (absolute)."""
    differences: tuple[str, ...] = ()
    """Known differences of setting between the paper's run and ours, whatever the numbers."""


REFUSAL_DIFFERENCES = (
    "refusal planted by a 60-step fine-tune trained to be mediated by the difference of means at L6 and L12 "
    "(ep finetune --plant mediated; one direction at L12 only), not gemma-2-2b-it's own",
    "prompts: the project's chat data (224 harmful at most) vs 300 + 300",
)

FIGURES: dict[str, Figure] = {
    "refusal_baseline": Figure(
        title="refusal: baseline harmful refusal",
        figure="0.98 held-out harmful refusal, unhooked (gemma-2-2b-it, 300 + 300 prompts, greedy 60 tokens)",
        model="gemma-2-2b-it", layer=20, percentile=8.0, tokens="300 + 300 prompts' activations",
        source="scripts/make_fig_refusal.py:104 (figure title: baseline refusal 0.98)",
        targets={"heldout_harmful_refusal": 0.98}, tolerance=0.05, differences=REFUSAL_DIFFERENCES),
    "refusal_k1": Figure(
        title="refusal: one region ablated (K=1)",
        figure="change in harmful refusal at p=8, K=1: 0.00 (exemplar basis), -0.04 (mean basis); "
               "the refusal cluster fragments across 3 regions at p=8",
        model="gemma-2-2b-it", layer=20, percentile=8.0, tokens="300 + 300 prompts' activations",
        source="scripts/make_fig_refusal.py:32-34 (P8_FALLBACK, 'Numbers from paper tab:ablation')",
        targets={"exemplar": 0.00, "mean": -0.04}, tolerance=0.05,
        differences=(*REFUSAL_DIFFERENCES, "the paper's other p (5..20) are plotted, not published as numbers")),
    "refusal_best": Figure(
        title="refusal: best ablation, null, capability, ceiling",
        figure="p-sweep figure (p 5..20, K=1 change per basis); no capability measurement in the authors' "
               "code; null control ablated at K=1, values not published",
        model="gemma-2-2b-it", layer=20, percentile=8.0, tokens="300 + 300 prompts' activations",
        source="scripts/make_fig_refusal.py; scripts/exp_behavioral.py",
        differences=(*REFUSAL_DIFFERENCES, "ours adds a capability ratio and the difference-of-means ceiling")),
    "concepts": Figure(
        title="concept detection (AxBench)",
        figure="EP mean AUROC 0.881 (GemmaScope SAE leaderboard 0.755, SAE-A 0.911)",
        model="gemma-2-2b-it", layer=20, percentile=1.0, tokens="3,649,152 tokens, 5,796 regions",
        source="README.md:5", targets={"mean_auroc": 0.881}, tolerance=0.05,
        differences=("concepts: 8 built-in ones (stdlib topics, refusal, code), not AxBench's Concept500",
                     "the basis (exemplar or mean direction) behind 0.881 is not stated; ours scores the exemplar",
                     "baselines: ours difference of means; the paper's two SAE leaderboard entries")),
    "probe": Figure(
        title="sparse probing (SAEBench)",
        figure="EP one-hot probes retain ~97% of raw-activation probe accuracy at l0 = 1 (k = 1)",
        model="gemma-2-2b", layer=12, percentile=10.0, tokens=BUILDS,
        source="README.md:5", targets={"retention_onehot": 0.97}, tolerance=0.03,
        differences=("tasks: 3 built-in ones, not SAEBench's 8 data sets",
                     "the paper's denominator is not stated: the published protocol shows raw all-D and raw top-1",
                     "ours: standardised features, retention over the all-D raw probe")),
    "sae": Figure(
        title="EP regions vs SAE features",
        figure="~20% of EP regions match an SAE feature at F1 > 0.5 (Gemma Scope 16k, top-100 binarisation, "
               ">= 20 positives)",
        model="gemma-2-2b", layer=12, percentile=None, tokens="500,000 tokens compared",
        source="README.md:5", targets={"ep_to_sae_share_f1_gt_05": 0.20}, tolerance=0.05,
        differences=("SAE: our TopK SAE (SAELens) trained on our activations, not Gemma Scope 16k",
                     "compared on held-out tokens; the paper on its build tokens")),
    "ood": Figure(
        title="OOD: within-theta rate of random tokens",
        figure="within-theta rate on random token ids drops to 0.875 at p1 (gemma-2-2b-it L20 p1..p10); "
               "other rates not published",
        model="gemma-2-2b-it", layer=20, percentile=1.0, tokens=BUILDS,
        source="scripts/make_fig_coverage.py:116", targets={"within_theta_rate": 0.875}, tolerance=0.05,
        differences=("the experiment is no longer in the revised paper (make_fig_coverage.py docstring)",
                     "sets: held-out builtin, shuffled words, random ids; no other-language set "
                     "(paper: Pile, Bulgarian Wikipedia, random tokens)")),
}
"""The claims, in the table's order."""

NO_PAPER_PROTOCOL = {
    "sae": "no paper protocol in ep_store (ep sae compare has one protocol)",
    "ood": "no paper protocol in ep_store (ep eval ood has one protocol)",
}
"""Claims whose command has no ``--protocol paper``: what the published-protocol cell says."""


def verdict(pairs: list[tuple[float, float]], tolerance: float | None) -> str:
    """yes / partly / no / not measured for (ours, paper) pairs; "not published" without a tolerance."""
    if tolerance is None:
        return "not published"
    if not pairs:
        return "not measured"
    within = [abs(ours - paper) <= tolerance + 1e-9 for ours, paper in pairs]
    return "yes" if all(within) else "partly" if any(within) else "no"


def rule(figure: Figure) -> str:
    """The verdict rule of ``figure`` in words."""
    if figure.tolerance is None:
        return "the paper publishes no number for this claim"
    return (f"each of ours within {figure.tolerance:g} of the paper's figure: yes; some: partly; none: no "
            "(decided on the published protocol where it ran, else on ours)")
