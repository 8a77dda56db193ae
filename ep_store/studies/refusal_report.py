"""The refusal study's report (HTML and Markdown, matplotlib plots), beside the diff reports.

Written by ``ep refusal`` from its metrics (ep_store.studies.refusal): the refusal table per
dictionary (unhooked; ablation of the top k = 1..5 regions, exemplar and mean bases; the
null region; steering), a plot of held-out harmful refusal against k, the recommended
condition, the base-vs-fine-tuned match status of its regions and the control ablation.
"""

from __future__ import annotations

from pathlib import Path

from ep_store import plots
from ep_store.analysis.report import environment


def refusal_curves(sweep: dict, unhooked: float, path: Path) -> str | None:
    """Held-out harmful refusal against k for exemplar, mean and null ablation."""
    by = {b: {c["k"]: c["heldout_harmful_refusal"] for c in sweep["conditions"] if c["basis"] == b}
          for b in ("exemplar", "mean", "null")}
    ks = sorted(by["exemplar"])
    if not ks:
        return None
    series = {"exemplar": [by["exemplar"][k] for k in ks], "mean": [by["mean"].get(k) for k in ks],
              "unhooked": [unhooked] * len(ks)}
    if by["null"]:
        series["null (k=1)"] = [by["null"][1]] * len(ks)
    styles = {"unhooked": {"ls": "--", "color": "gray", "lw": 2.5},
              "null (k=1)": {"ls": ":", "marker": "x", "color": "C3"}}
    return plots.lines(ks, series, path, f"{sweep['dictionary']}: ablation", "k (regions ablated)",
                       "held-out harmful refusal", styles)


def table_rows(result: dict) -> list[dict]:
    """One row per condition: dictionary, condition, k, regions, refusal rates, capability ratio."""
    u = result["unhooked"]
    rows = [{"dictionary": "-", "condition": "unhooked", "k": 0, "regions": "", "harmful": u["heldout_harmful_refusal"],
             "benign": u["heldout_benign_refusal"], "capability": 1.0}]
    for s in result["sweeps"]:
        for c in s["conditions"]:
            rows.append({"dictionary": s["dictionary"], "condition": c["basis"], "k": c["k"],
                         "regions": ",".join(map(str, c["regions"])), "harmful": c["heldout_harmful_refusal"],
                         "benign": c["heldout_benign_refusal"], "capability": c["capability_ratio"]})
        for st in s["steering"]:
            rows.append({"dictionary": s["dictionary"], "condition": f"steer alpha={st['alpha']:g}", "k": 1,
                         "regions": str(st["region_id"]), "harmful": None, "benign": st["heldout_benign_refusal"],
                         "capability": None})
    return rows


def refusal_report(result: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in result["sweeps"]:
        name = s["dictionary"].replace("/", "~") + ".png"
        image = refusal_curves(s, result["unhooked"]["heldout_harmful_refusal"], out / name)
        if image:
            images[s["dictionary"]] = image
    context = {"r": result, "rows": table_rows(result), "images": images}
    (out / "index.html").write_text(environment().get_template("refusal.html.j2").render(**context), encoding="utf-8")
    (out / "README.md").write_text(environment(html=False).get_template("refusal.md.j2").render(**context),
                                   encoding="utf-8")
    return {"out": str(out / "index.html")}
