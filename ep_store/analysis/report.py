"""Static HTML reports a person can open from disk: the region browser of one dictionary.

    ep report dictionary gemma-3-270m/base/L6/p1 --out data/reports/gemma-3-270m~base~L6~p1

All numbers come from the canned SQL questions (ep_store/sql/queries); plots are matplotlib
PNGs; the page is one jinja2 template with a small inline search filter and no server.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import jinja2

from ep_store import jsonio, plots
from ep_store.errors import check_output_folder
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask, check_options

ALL = 2**31 - 1  # "no limit" for the canned questions


def visible(token: str) -> str:
    """Show whitespace tokens: newline as ⏎, leading/trailing spaces as ·."""
    if token is None:
        return ""
    text = token.replace("\n", "⏎").replace("\t", "⇥")
    stripped = text.strip(" ")
    lead, trail = len(text) - len(text.lstrip(" ")), len(text) - len(text.rstrip(" "))
    return "·" * lead + stripped + "·" * trail if stripped else "·" * len(text)


def environment(html: bool = True) -> jinja2.Environment:
    """Templates of ep_store/analysis/templates; HTML-escaped unless rendering Markdown."""
    env = jinja2.Environment(loader=jinja2.PackageLoader("ep_store.analysis", "templates"), autoescape=html)
    env.filters["visible"] = visible
    return env


def region_cards(db: StoreDB, key: DictionaryKey, context: int, per_region: int) -> list[dict]:
    """One dict per region: size, coherence, exemplar in context, top tokens, top contexts."""
    members = {r["region_id"]: r for r in ask(db, key, "region_members").to_pylist()}
    tops = {r["region_id"]: r for r in ask(db, key, "top_tokens", limit=ALL, top=5).to_pylist()}
    contexts = defaultdict(list)
    for r in ask(db, key, "top_contexts", limit=ALL, per_region=per_region, context=context).to_pylist():
        contexts[r["region_id"]].append(r)
    cards = []
    for ex in ask(db, key, "exemplar_contexts", limit=ALL, context=context).to_pylist():
        rid = ex["region_id"]
        top = tops.get(rid, {})
        cards.append({
            # Two sizes of one region (issue 18, D13): tokens finally assigned to it, and the
            # members the build passed (first-come; the exemplars table's member_count).
            "region_id": rid, "size": members.get(rid, {}).get("assigned_tokens", 0), "build_members": ex["member_count"],
            "coherence": ex["coherence"], "exemplar": ex,
            "top_tokens": list(zip(top.get("top_tokens", []), top.get("top_counts", []))),
            "purity": top.get("purity"), "entropy": top.get("entropy_bits"),
            "contexts": contexts.get(rid, []),
        })
    cards.sort(key=lambda c: (-c["size"], c["region_id"]))
    return cards


def dictionary_report(store, key: DictionaryKey | str, out: Path, context: int = 8, per_region: int = 3,
                      as_of: str | None = None) -> dict:
    start = time.perf_counter()
    check_output_folder(out, "--out")
    check_options({"context": context, "per_region": per_region})
    db = StoreDB(store, as_of)  # one snapshot per dictionary (issue 18, A1)
    key = db.require(key)
    summary = db.query("SELECT * FROM dictionaries WHERE key = $key", {"key": str(key)}).to_pylist()[0]
    sat = ask(db, key, "saturation").to_pydict()
    # Reads the snapshot's assignments: a build without any is refused before --out is touched.
    dist = ask(db, key, "distances").to_pydict()
    cards = region_cards(db, key, context, per_region)
    out.mkdir(parents=True, exist_ok=True)
    images = {
        "saturation": plots.saturation_curve(sat["tokens"], sat["regions"], sat["new_regions"],
                                             out / "saturation.png", f"{key}: saturation"),
        "sizes": plots.size_histogram([c["size"] for c in cards if c["size"]], out / "sizes.png",
                                      f"{key}: region sizes"),
        "distances": plots.bar_histogram(dist["distance_from"], dist["tokens"], 0.05, out / "distances.png",
                                         f"{key}: distance to nearest exemplar", "cosine distance", "tokens",
                                         vline=summary["theta"]),
    }
    from ep_store.evaluate.output import eval_links

    html = environment().get_template("dictionary.html.j2").render(
        key=str(key), summary=summary, percentile=key.relpath().name, images=images, cards=cards, context=context,
        evals=eval_links(out, [key]))
    (out / "index.html").write_text(html, encoding="utf-8")
    (out / "regions.json").write_text(jsonio.dumps(cards))
    return {"dictionary": str(key), "out": str(out / "index.html"), "regions": len(cards),
            "seconds": round(time.perf_counter() - start, 3)}
