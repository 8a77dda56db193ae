"""Outputs of ``ep sae compare``: metrics.json, pairs.csv, the F1 distribution plot and a README
with the top matched pairs and their top tokens side by side (issue 11)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ep_store import jsonio, plots

TOKENS_SHOWN = 8


def top_tokens(sets, held: dict) -> dict[int, list[str]]:
    """The first tokens (highest activation first) of each eligible feature's set."""
    index = {(int(d), int(p)): t for d, p, t in zip(held["doc_id"], held["pos"], held["token"])}
    out: dict[int, list[str]] = {}
    for f, d, p in zip(sets.feature, sets.doc_id, sets.pos):
        shown = out.setdefault(int(f), [])
        if len(shown) < TOKENS_SHOWN:
            shown.append(index.get((int(d), int(p)), "?"))
    return out


def write_outputs(out: Path, metrics: dict, s: dict, held: dict, top_pairs: int, ep_sets=None, sae_sets=None) -> dict:
    """Write every file; returns {"out": ..., "files": [...], "top_pairs": [...]} to merge into the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    ha, hb, hf = s["hungarian"]
    hung = {int(a): (int(b), float(f)) for a, b, f in zip(ha, hb, hf)}
    with (out / "pairs.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["side", "feature", "best_partner", "best_f1", "hungarian_partner", "hungarian_f1"])
        for i, r in enumerate(s["ep_ids"]):
            hp, hfv = hung.get(int(r), (None, None))
            w.writerow(["ep", int(r), int(s["ep_best_partner"][i]), float(s["ep_best_f1"][i]), hp, hfv])
        for i, r in enumerate(s["sae_ids"]):
            w.writerow(["sae", int(r), int(s["sae_best_partner"][i]), float(s["sae_best_f1"][i]), None, None])
    edges = np.linspace(0, 1, 21)
    ep_counts, _ = np.histogram(s["ep_best_f1"], edges)
    plot = plots.bar_histogram(edges[:-1], ep_counts, 0.05, out / "f1_distribution.png",
                               f"{metrics['dictionary']} vs {metrics['sae'].rsplit('/', 1)[-1]}: best SAE match per EP region",
                               "best F1", "EP regions", vline=metrics["f1_threshold"])
    order = np.argsort(-hf, kind="stable")[:top_pairs]
    ep_tok = top_tokens(ep_sets, held) if ep_sets is not None else {}
    sae_tok = top_tokens(sae_sets, held) if sae_sets is not None else {}
    pairs = [{"region_id": int(ha[i]), "feature_id": int(hb[i]), "f1": round(float(hf[i]), 4),
              "region_tokens": ep_tok.get(int(ha[i]), []), "feature_tokens": sae_tok.get(int(hb[i]), [])}
             for i in order]
    extra = {"out": str(out), "files": ["metrics.json", "pairs.csv", plot, "README.md"], "top_pairs": pairs,
             "f1_histogram": {"edges": edges.round(3).tolist(), "ep_regions": ep_counts.tolist(),
                              "sae_features": np.histogram(s["sae_best_f1"], edges)[0].tolist()}}
    jsonio.write(out / "metrics.json", metrics | extra)
    (out / "README.md").write_text(readme(metrics | extra, plot))
    return extra


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def readme(m: dict, plot: str) -> str:
    c = m["compute"]
    lines = [
        f"# EP vs SAE: {m['dictionary']} against {m['sae']}", "",
        f"Held-out tokens: {m['heldout_tokens']} (dataset rows {m['heldout_rows'][0]}..{m['heldout_rows'][1]}), "
        "used by neither the SAE's training nor the EP build. Binarisation: "
        f"{m['protocol']['binarisation']}; EP score: {m['protocol']['ep_score']}.", "",
        "| | value |", "|---|---|",
        f"| EP regions whose best SAE match has F1 > {m['f1_threshold']} | {_pct(m['ep_to_sae_share_f1_gt_05'])} "
        f"of {m['eligible']['ep_regions']} eligible |",
        f"| SAE features whose best EP match has F1 > {m['f1_threshold']} | {_pct(m['sae_to_ep_share_f1_gt_05'])} "
        f"of {m['eligible']['sae_features']} eligible |",
        f"| one-to-one (Hungarian) pairs with F1 > {m['f1_threshold']} | {m['hungarian_pairs_f1_gt_05']} |",
        f"| SQL F1 table equals the numpy reference | {m['sql_matches_numpy']} |",
        *([f"| build FLOPs, SAE / EP | {c['flops_ratio_sae_over_ep']} ({c['sae']['flops']:.3g} / {c['ep']['flops']:.3g}) |",
           f"| tokens, SAE / EP | {c['tokens_ratio_sae_over_ep']} ({c['sae']['tokens']} / {c['ep']['tokens']}) |"]
          if c else ["| build compute | the SAE's training run is unknown (--sae-path) |"]),
        "", "Wall times vary from run to run: they are in metrics.json (`seconds_ratio_sae_over_ep`), not here.",
        "", f"![best-match F1 distribution]({plot})", "", "## Top one-to-one pairs", "",
        "| region | feature | F1 | region's top tokens | feature's top tokens |", "|---|---|---|---|---|",
    ]
    for p in m["top_pairs"]:
        lines.append(f"| {p['region_id']} | {p['feature_id']} | {p['f1']} | {_toks(p['region_tokens'])} | "
                     f"{_toks(p['feature_tokens'])} |")
    if m.get("probe"):
        lines += ["", "## Sparse probing", "", m["probe"].get("table_markdown", "")]
    return "\n".join(lines) + "\n"


def _toks(tokens: list[str]) -> str:
    return " ".join("`" + t.replace("|", "\\|").replace("`", "'").replace("\n", "\\n") + "`" for t in tokens)


HEADLINE = ("ep_to_sae_share_f1_gt_05", "sae_to_ep_share_f1_gt_05", "hungarian_pairs_f1_gt_05", "eligible",
            "ep_mean_best_f1", "sae_mean_best_f1", "sql_matches_numpy", "heldout_tokens")


SUMMARY = ("dictionary", "sae", "ep_to_sae_share_f1_gt_05", "sae_to_ep_share_f1_gt_05", "hungarian_pairs_f1_gt_05",
           "sql_matches_numpy", "out")


def summary_line(metrics: dict) -> dict:
    """The one-line summary of ``ep sae compare``: a few figures of ``compare``'s metrics.json."""
    compute = metrics["compute"] or {}  # None for an SAE from --sae-path: its training run is unknown
    return {k: metrics[k] for k in SUMMARY} | {"flops_ratio_sae_over_ep": compute.get("flops_ratio_sae_over_ep")}


def summarise_files(paths: list[Path], out: Path) -> dict:
    """One JSON of the headline figures of several comparisons (the pipeline's data/metrics/sae_compare.json)."""
    from ep_store.errors import UsageError

    summary = {}
    files = []
    for path in paths:
        if path.is_dir():
            files += [path / "metrics.json"] if (path / "metrics.json").is_file() else sorted(path.glob("*/metrics.json"))
        else:
            files.append(path)
    if not files:
        raise UsageError(f"no metrics.json under {', '.join(map(str, paths))}; run ep sae compare first")
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path} does not exist; run ep sae compare first")
        m = json.loads(path.read_text())
        c = m["compute"] or {"ep": {}, "sae": {}}  # None: an SAE from --sae-path
        summary[f"{m['dictionary']}~{m['sae'].rstrip('/').rsplit('/', 1)[-1]}"] = {k: m.get(k) for k in HEADLINE} | {
            "flops_ratio_sae_over_ep": c.get("flops_ratio_sae_over_ep"),
            "seconds_ratio_sae_over_ep": c.get("seconds_ratio_sae_over_ep"),
            "ep_seconds": c["ep"].get("seconds"), "sae_seconds": c["sae"].get("seconds"),
            "probe": m.get("probe", {}).get("mean_by_k")}
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonio.write(out, summary)
    return {"comparisons": len(summary), "out": str(out)}


def compute_comparison(ep: dict, smeta: dict) -> dict:
    """Tokens, estimated FLOPs and wall time of the EP build against the SAE's training, and the ratios."""
    ep_side = {"tokens": max(ep["tokens"], ep["calibration_tokens"]), "build_tokens": ep["tokens"], "calibration_tokens": ep["calibration_tokens"], "flops": ep["flops"],
               "calibration_flops": ep["calibration_flops"], "screen_flops": ep["screen_flops"],
               "seconds": round(ep["seconds"], 3), "cpu_seconds": round(ep["cpu_seconds"], 3)}
    sae_side = {"tokens": smeta["tokens"], "flops": smeta["flops"], "seconds": smeta["seconds"],
                "cpu_seconds": smeta.get("cpu_seconds"),
                "flops_formula": smeta.get("flops_formula"), "device": smeta.get("device")}
    return {"ep": ep_side, "sae": sae_side,
            "flops_ratio_sae_over_ep": _ratio(sae_side["flops"], ep_side["flops"]),
            "seconds_ratio_sae_over_ep": _ratio(sae_side["seconds"], ep_side["seconds"]),
            "cpu_seconds_ratio_sae_over_ep": (None if sae_side["cpu_seconds"] is None else
                                              _ratio(sae_side["cpu_seconds"], ep_side["cpu_seconds"])),
            "tokens_ratio_sae_over_ep": _ratio(sae_side["tokens"], ep_side["tokens"]),
            "note": "EP build timed in this run, the SAE in its training run (ep sae train), on the same machine; "
                    "on a shared machine prefer the FLOPs and CPU-seconds ratios to the wall-time ratio"}


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b and math.isfinite(a / b) else None
