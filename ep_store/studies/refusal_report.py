"""The refusal study's report (HTML and Markdown, matplotlib plots), beside the diff reports.

Written by ``ep refusal`` from its metrics (ep_store.studies.refusal): the refusal table per
dictionary (unhooked; ablation of the top k = 1..5 regions, exemplar and mean bases; the
null region; steering), a plot of held-out harmful refusal against k, the recommended
condition, the base-vs-fine-tuned match status of its regions and the control ablation; with
issue 22's options, the re-anchored basis, one sweep per stream-order seed (dictionaries named
``KEY seed S``) and each layer's difference-of-means ceiling.
"""

from __future__ import annotations

from pathlib import Path

from ep_store import plots
from ep_store.analysis.report import environment


def refusal_curves(sweep: dict, unhooked: float, path: Path) -> str | None:
    """Held-out harmful refusal against k for exemplar, mean and null ablation."""
    by: dict[str, dict] = {}
    for c in sweep["conditions"]:
        by.setdefault(condition(c), {})[c["k"]] = c["heldout_harmful_refusal"]
    ks = sorted({k for name, rates in by.items() if not name.startswith("null") for k in rates})
    if not ks:
        return None
    series = {name: [rates.get(k) for k in ks] for name, rates in by.items() if not name.startswith("null")}
    series["unhooked"] = [unhooked] * len(ks)
    styles = {"unhooked": {"ls": "--", "color": "gray", "lw": 2.5}}
    for i, (name, rates) in enumerate((n, r) for n, r in by.items() if n.startswith("null")):
        series[f"{name} (k=1)"] = [rates[1]] * len(ks)
        styles[f"{name} (k=1)"] = {"ls": ":", "marker": "x", "color": f"C{3 + i}"}
    return plots.lines(ks, series, path, f"{sweep['dictionary']}: ablation", "k (regions ablated)",
                       "held-out harmful refusal", styles)


def condition(c: dict) -> str:
    """A condition's name: its basis, and a null region's direction unless it is the exemplar."""
    direction = c.get("direction", "exemplar")
    return c["basis"] if c["basis"] != "null" or direction == "exemplar" else f"null ({direction})"


def named(sweep: dict) -> str:
    """A sweep's dictionary, with its stream-order seed when it has one."""
    return sweep["dictionary"] if sweep.get("seed") is None else f"{sweep['dictionary']} seed {sweep['seed']}"


def table_rows(result: dict) -> list[dict]:
    """One row per condition: dictionary, condition, k, regions, refusal rates, capability ratio."""
    u = result["unhooked"]
    rows = [{"dictionary": "-", "condition": "unhooked", "k": 0, "regions": "", "harmful": u["heldout_harmful_refusal"],
             "benign": u["heldout_benign_refusal"], "capability": 1.0}]
    for s in result["sweeps"]:
        for c in s["conditions"]:
            rows.append({"dictionary": s["dictionary"], "condition": condition(c), "k": c["k"],
                         "regions": ",".join(map(str, c["regions"])), "harmful": c["heldout_harmful_refusal"],
                         "benign": c["heldout_benign_refusal"], "capability": c["capability_ratio"]})
        for st in s["steering"]:
            rows.append({"dictionary": s["dictionary"], "condition": f"steer alpha={st['alpha']:g}", "k": 1,
                         "regions": str(st["region_id"]), "harmful": None, "benign": st["heldout_benign_refusal"],
                         "capability": None})
    planted = (result.get("plant") or {}).get("ablated") or []
    for what, entries in (("diff-of-means ceiling", result.get("ceiling") or []), ("planted direction", planted)):
        for c in entries:
            for name, m in (("centered", c), ("around the origin", c.get("uncentered")),
                            ("at the prompts' mean", c.get("prompt_mean"))):
                if m:
                    rows.append({"dictionary": f"L{c['layer']}", "condition": f"{what} ({name})", "k": 1,
                                 "regions": "", "harmful": m["heldout_harmful_refusal"],
                                 "benign": m["heldout_benign_refusal"], "capability": m["capability_ratio"]})
    return rows


def refusal_report(result: dict, out: Path) -> dict:
    # Sweeps of several seeds share dictionary keys: the report names them with their seed.
    result = {**result, "sweeps": [{**s, "dictionary": named(s)} for s in result["sweeps"]]}
    if result.get("best"):
        result["best"] = {**result["best"], "dictionary": named(result["best"])}
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for s in result["sweeps"]:
        name = s["dictionary"].replace("/", "~").replace(" ", "~") + ".png"
        image = refusal_curves(s, result["unhooked"]["heldout_harmful_refusal"], out / name)
        if image:
            images[s["dictionary"]] = image
    context = {"r": result, "rows": table_rows(result), "images": images}
    (out / "index.html").write_text(environment().get_template("refusal.html.j2").render(**context), encoding="utf-8")
    (out / "README.md").write_text(environment(html=False).get_template("refusal.md.j2").render(**context),
                                   encoding="utf-8")
    return {"out": str(out / "index.html")}
