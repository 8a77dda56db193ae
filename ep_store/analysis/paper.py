"""The paper table (issue 22, item 4): each claim of Rumbelow 2026 (arXiv 2605.14347) beside ours,
under the published protocol and under our own, read from the metrics files the pipeline writes.

    ep report paper --refusal data/metrics/refusal.json \\
        --probe data/metrics/eval_probe_gemma-3-270m~base.json \\
        --concepts data/metrics/eval_concepts_gemma-3-270m~base.json \\
        --ood data/metrics/eval_ood_gemma-3-270m~base.json --sae data/metrics/sae_compare.json \\
        --store data/store --refusal-store data/store/refusal \\
        --out data/reports/paper --metrics data/metrics/paper.json

Writes ``out``/README.md (the table, then a note per claim) whole or not at all, and the metrics
JSON (strict: NaN as null). The paper's figures are the registry of
``ep_store.analysis.paper_figures``; what each file answers, ``ep_store.analysis.paper_measures``.
``--probe-paper``, ``--concepts-paper`` and ``--refusal-paper`` take the same commands' output
under ``--protocol paper`` (each file records its protocol). A file not given or not there makes
its rows say so and name the command that writes it; a file that is not a JSON object is bad
input (UsageError, exit 2). Dictionary token counts come from the stores' published meta.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

from ep_store import jsonio
from ep_store.analysis import paper_measures as pm
from ep_store.analysis.paper_figures import FIGURES, NO_PAPER_PROTOCOL, Figure, rule, verdict
from ep_store.errors import UsageError, check_output_file
from ep_store.keys import DictionaryKey, format_percentile


@dataclass(kw_only=True)
class PaperConfig:
    out: Path
    """Folder written whole: README.md."""
    metrics: Path | None = None
    """The metrics JSON (every claim's numbers and verdict)."""
    refusal: Path | None = None
    """``ep refusal --metrics`` file of our protocol."""
    refusal_paper: Path | None = None
    """The same under ``ep refusal --protocol paper``."""
    probe: Path | None = None
    """``ep eval probe --metrics`` file of our protocol."""
    probe_paper: Path | None = None
    """The same under ``--protocol paper``."""
    concepts: Path | None = None
    """``ep eval concepts --metrics`` file of our protocol."""
    concepts_paper: Path | None = None
    """The same under ``--protocol paper``."""
    ood: Path | None = None
    """``ep eval ood --metrics`` file (one protocol)."""
    sae: Path | None = None
    """``ep sae summary`` file (the pipeline's data/metrics/sae_compare.json)."""
    store: Path | None = None
    """Store of the evaluated dictionaries, for their token counts (None: not shown)."""
    refusal_store: Path | None = None
    """``ep refusal --work-store`` of our protocol's run (``seed<s>`` folders in it where seeded)."""
    refusal_paper_store: Path | None = None
    """``--work-store`` of the paper-protocol run."""

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, None if value is None else Path(value))


class Source(NamedTuple):
    """One metrics file: its JSON, or why there is none."""

    option: str
    path: Path | None
    protocol: str
    data: dict | None
    problem: str
    store: Path | None


INPUTS = {  # input name -> (claims' option, protocol expected, the command that writes it)
    "refusal": ("--refusal", "ours", "dvc repro refusal"),
    "refusal_paper": ("--refusal-paper", "paper", "ep refusal --protocol paper --work-store data/store/refusal_paper "
                      "--metrics {path} --report data/reports/refusal_paper (about 40 min per layer x p x seed on 2 cores)"),
    "probe": ("--probe", "ours", "dvc repro eval_probe"),
    "probe_paper": ("--probe-paper", "paper", "ep eval probe --protocol paper --dictionary {target}/all "
                    "--out data/reports/evals/probe_paper/{slug} --metrics {path}"),
    "concepts": ("--concepts", "ours", "dvc repro eval_concepts"),
    "concepts_paper": ("--concepts-paper", "paper", "ep eval concepts --protocol paper --dictionary {target}/all "
                       "--out data/reports/evals/concepts_paper/{slug} --metrics {path}"),
    "ood": ("--ood", "ours", "dvc repro eval_ood"),
    "sae": ("--sae", "ours", "dvc repro sae_metrics"),
}
DEFAULT_TARGET = "gemma-3-270m/base"  # the pipeline's first evaluate target, when no file names one

CLAIMS = {  # claim -> (input of our protocol, what one file answers); paper_figures.FIGURES's order
    "refusal_baseline": ("refusal", pm.measure_refusal_baseline),
    "refusal_k1": ("refusal", pm.measure_refusal_k1),
    "refusal_best": ("refusal", pm.measure_refusal_best),
    "concepts": ("concepts", pm.measure_concepts),
    "probe": ("probe", pm.measure_probe),
    "sae": ("sae", pm.measure_sae),
    "ood": ("ood", pm.measure_ood),
}
COLUMNS = ("claim", "paper figure (setting)", "ours, published protocol", "ours, our protocol",
           "model and tokens (paper / ours)", "reproduces?", "remaining differences")


def read_source(name: str, path: Path | None, store: Path | None) -> Source:
    """The JSON of input ``name`` at ``path``; a missing file or another protocol is a problem, not an error."""
    option, protocol, _ = INPUTS[name]
    if path is None:
        return Source(option, None, protocol, None, f"{option} not given", store)
    if not path.exists():
        return Source(option, path, protocol, None, f"{option} {path} missing", store)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; pass the metrics JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # bad JSON or bad UTF-8
        raise UsageError(f"{option} {path} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{option} {path} is not a JSON object")
    recorded = data.get("protocol", "ours")  # files of one-protocol commands record none
    if recorded != protocol:
        return Source(option, path, protocol, None, f"{option} {path} records protocol {recorded!r}, not {protocol!r}", store)
    return Source(option, path, protocol, data, "", store)


def read_sources(cfg: PaperConfig) -> dict[str, Source]:
    stores = {"refusal": cfg.refusal_store, "refusal_paper": cfg.refusal_paper_store}
    return {name: read_source(name, getattr(cfg, name), stores.get(name, cfg.store)) for name in INPUTS}


def run_hint(name: str, source: Source, target: str) -> str:
    """The command that writes input ``name``, for a row that lacks it."""
    slug = target.replace("/", "~")
    default = "data/metrics/refusal_paper.json" if name == "refusal_paper" else f"data/metrics/eval_{name}_{slug}.json"
    return INPUTS[name][2].format(path=source.path or default, target=target, slug=slug)


def dictionary_tokens(store: Path | None, key: str, seed: int | None) -> int | None:
    """Tokens of the published build of ``key`` (meta ``tokens``); None where unknown."""
    from ep_store.store.core import Store

    if store is None:
        return None
    root = store if seed is None else store / f"seed{seed}"
    try:
        return Store(root).dictionary_snapshot(DictionaryKey.parse(key)).meta.get("tokens")
    except UsageError:
        return None


def tokens_text(source: Source, measure: pm.Measure) -> str:
    if not measure.dictionaries:
        return "no dictionary"
    if source.store is None:
        return "dictionary tokens not read (no store given)"
    counts = sorted({n for key, seed in measure.dictionaries
                     if (n := dictionary_tokens(source.store, key, seed)) is not None})
    if not counts:
        return f"dictionary tokens unknown (not in {source.store})"
    span = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"
    return f"{span} tokens per dictionary"


def setting(m: pm.Measure) -> str:
    layers = ", ".join(f"L{x}" for x in m.layers)
    ps = ", ".join(f"p{format_percentile(p)}" for p in m.percentiles)
    return " ".join(x for x in (m.model, layers, ps) if x)


def differences(fig: Figure, measures: list[pm.Measure], fell_back: str) -> list[str]:
    """The row's remaining differences: model, layer and p where ours differ, why the verdict
    fell back to our protocol (``fell_back``, '' where it did not), then the figure's own."""
    out = []
    for m in measures[:1]:  # ours under the published protocol if it ran, else ours
        if m.model.split("/")[0] != fig.model:
            out.append(f"model {m.model.split('/')[0]} vs {fig.model}")
        if m.layers and fig.layer not in m.layers:
            out.append(f"layer {', '.join(f'L{x}' for x in m.layers)} vs L{fig.layer}")
        if fig.percentile is not None and m.percentiles and fig.percentile not in m.percentiles:
            out.append(f"p{format_percentile(m.percentiles[0])} (nearest run) vs p{format_percentile(fig.percentile)}")
    if fell_back:
        out.append(f"{fell_back}: the verdict is on ours")
    return out + list(fig.differences)


@dataclass
class Row:
    """One claim: the table's cells, the notes and the numbers."""

    claim: str
    cells: dict[str, str]
    verdict: str
    verdict_on: str | None
    notes: list[str]
    values: dict


def published_text(claim: str, published: Source | None, theirs: pm.Measure | None, target: str) -> str:
    """The published-protocol cell: its measure, else why it is absent and the command that runs it."""
    if published is None:
        return NO_PAPER_PROTOCOL.get(claim, "no paper protocol")
    if theirs is None:
        name = CLAIMS[claim][0]
        return (f"not run in the default pipeline ({published.problem}); run: "
                f"{run_hint(f'{name}_paper', published, target)}")
    return theirs.cell


def models_text(fig: Figure, runs: list[tuple[str, Source, pm.Measure]]) -> str:
    """The paper's model, layer, p and tokens / each of our runs'."""
    pct = f" p{format_percentile(fig.percentile)}" if fig.percentile is not None else ""
    ours = "; ".join(f"{label}: {setting(m)}, {tokens_text(src, m)}" for label, src, m in runs) or "not measured"
    return f"paper: {fig.model} L{fig.layer}{pct}, {fig.tokens} / {ours}"


def claim_row(claim: str, sources: dict[str, Source]) -> Row:
    """The row of ``claim`` from its inputs under both protocols."""
    fig, (name, measure) = FIGURES[claim], CLAIMS[claim]
    ours, published = sources[name], sources.get(f"{name}_paper")
    mine = measure(ours.data, fig) if ours.data is not None else None
    theirs = measure(published.data, fig) if published is not None and published.data is not None else None
    on_theirs = theirs is not None and bool(theirs.pairs)
    basis = theirs if on_theirs else mine
    v = verdict(basis.pairs if basis else [], fig.tolerance)
    verdict_on = None if v in ("not measured", "not published") else "published protocol" if on_theirs else "ours"
    target = next((m.model for m in (mine, theirs) if m and m.model), DEFAULT_TARGET).split(", ")[0]
    runs = [(label, src, m) for label, src, m in (("published protocol", published, theirs), ("ours", ours, mine)) if m]
    # Why a verdict was taken on ours: the published protocol did not run, or gave no number.
    fell_back = "" if verdict_on != "ours" or published is None else (
        "the published protocol did not run" if theirs is None else "the published protocol gave no comparable figure")
    diffs = differences(fig, [m for _, _, m in runs], fell_back)
    cells = dict(zip(COLUMNS, (
        fig.title, fig.figure, published_text(claim, published, theirs, target),
        mine.cell if mine else f"{ours.problem}; run: {run_hint(name, ours, target)}",
        models_text(fig, runs), f"{v} ({verdict_on})" if verdict_on else v, "; ".join(diffs))))
    notes = [f"paper: {fig.source}", f"rule: {rule(fig)}",
             *[src.problem or f"{src.option} {src.path}: read" for src in (published, ours) if src is not None]]
    values = {"paper": {"figure": fig.figure, "values": fig.targets, "tolerance": fig.tolerance, "source": fig.source},
              "published_protocol": theirs.values if theirs else None, "ours": mine.values if mine else None,
              "verdict": v, "verdict_on": verdict_on, "differences": diffs}
    return Row(claim, cells, v, verdict_on, notes, values)


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render(rows: list[Row]) -> str:
    """README.md: the table, the verdict rule, a note per claim."""
    lines = ["# The paper's claims: ours beside Rumbelow 2026", "",
             "Each claim of *Exemplar Partitioning for Mechanistic Interpretability* (arXiv 2605.14347) with the "
             "paper's figure, ours under the published protocol and under our own, and what still differs. The "
             "paper body was not available: its figures come from the authors' repository "
             "(jessicarumbelow/exemplar-partitioning: README.md and scripts/) and the J-RUM/exemplar-partitioning "
             "dataset card. Written by `ep report paper` from the pipeline's metrics files.", "",
             "Verdict: each of ours within the claim's tolerance of the paper's figure: yes; some: partly; none: "
             "no; decided on the published protocol where it ran, else on ours (named in brackets).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.cells[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", "## Notes"]
    for r in rows:
        lines += ["", f"### {r.cells['claim']}", "", *[f"- {n}" for n in r.notes]]
    return "\n".join(lines) + "\n"


def paper_report(cfg: PaperConfig) -> dict:
    """Read the metrics files, write ``cfg.out``/README.md and ``cfg.metrics``; the summary line."""
    from ep_store.evaluate.output import output_folder

    check_output_file(cfg.metrics, "--metrics")
    sources = read_sources(cfg)
    rows = [claim_row(claim, sources) for claim in FIGURES]
    with output_folder(cfg.out) as tmp:
        (tmp / "README.md").write_text(render(rows), encoding="utf-8")
    verdicts = dict(Counter(r.verdict for r in rows))
    inputs = {s.option: {"path": s.path, "protocol": s.protocol, "status": s.problem or "read"} for s in sources.values()}
    if cfg.metrics is not None:
        jsonio.write(cfg.metrics, {"claims": {r.claim: r.values for r in rows}, "verdicts": verdicts, "inputs": inputs})
    return {"out": str(cfg.out / "README.md"), "metrics": None if cfg.metrics is None else str(cfg.metrics),
            "claims": len(rows), "verdicts": verdicts,
            "missing": [s.option for s in sources.values() if s.data is None]}
