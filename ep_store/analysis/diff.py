"""Diff reports between two dictionaries (e.g. base vs a fine-tuned checkpoint), in HTML and
Markdown: what fine-tuning preserved, introduced and dropped, and where in the text it fires.

    ep diff gemma-3-270m/base/L6/p1 gemma-3-270m/sft/L6/p1 --out data/reports/diff/...

Sections: counts; a histogram of matched cosines; introduced regions ranked by size with
top contexts; dropped regions likewise; the preserved pairs that drifted most; how shared
tokens moved between regions; preserved/introduced counts against training step (for the
``<checkpoint>-step<k>`` matches in the store); and the finding: the share of introduced
vs preserved regions' members that lie in chat-turn markers or refusal text.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ep_store import jsonio, plots
from ep_store.analysis.match import MatchConfig, match
from ep_store.analysis.report import ALL, environment
from ep_store.errors import check_output_folder
from ep_store.evaluate.output import eval_links
from ep_store.keys import DictionaryKey
from ep_store.sql.db import StoreDB, ask, ask_pair, check_options
from ep_store.stages.corpus import dataset_span_labels
from ep_store.store.core import Store
from ep_store.store.streams import require_same_stream


def step_series(db: StoreDB, a: DictionaryKey, b: DictionaryKey, models_dir: Path) -> list[dict]:
    """Preserved/introduced counts of A against every <b.checkpoint>-step<k> and b itself.

    Raises UsageError when one of those matches was computed from other builds than the
    published ones (issue 18, A1)."""
    store, series = db.store, []
    final = models_dir / b.model / b.checkpoint / "finetune.json"
    final_step = json.loads(final.read_text())["steps"] if final.is_file() else None
    for files in store.list_matches(a):
        meta = store.read_json(files.meta)
        other = DictionaryKey.parse(meta["b"])
        if (other.model, other.layer, other.hook, other.percentile) != (b.model, b.layer, b.hook, b.percentile) \
                or other not in db.snapshots:
            continue
        db.require_current_match(meta)
        found = re.fullmatch(rf"{re.escape(b.checkpoint)}-step(\d+)", other.checkpoint)
        step = int(found.group(1)) if found else (final_step if other.checkpoint == b.checkpoint else None)
        if step is not None:
            series.append({"step": step, "checkpoint": other.checkpoint, "preserved": meta["preserved"],
                           "introduced": meta["introduced"], "dropped": meta["dropped"]})
    return sorted(series, key=lambda s: s["step"])


def region_sizes(db: StoreDB, key: DictionaryKey) -> dict[int, int]:
    return {r["region_id"]: r["assigned_tokens"] for r in ask(db, key, "region_members").to_pylist()}


def region_entries(db: StoreDB, key: DictionaryKey, region_ids: list[int], sizes: dict[int, int],
                   context: int) -> list[dict]:
    wanted = set(region_ids)
    tops = {r["region_id"]: r for r in ask(db, key, "top_tokens", limit=ALL, top=5).to_pylist()
            if r["region_id"] in wanted}
    contexts: dict[int, list] = {}
    for r in ask(db, key, "top_contexts", limit=ALL, per_region=3, context=context).to_pylist():
        if r["region_id"] in wanted:
            contexts.setdefault(r["region_id"], []).append(r)
    return [{"region_id": rid, "size": sizes.get(rid, 0),
             "top_tokens": list(zip(tops.get(rid, {}).get("top_tokens", []), tops.get(rid, {}).get("top_counts", []))),
             "contexts": contexts.get(rid, [])} for rid in region_ids]


def exemplar_tokens(db: StoreDB, key: DictionaryKey) -> dict[int, str]:
    rows = db.query("SELECT region_id, token FROM exemplars WHERE model = $m AND checkpoint = $c AND layer = $l "
                    "AND hook = $h AND percentile = $p", {"m": key.model, "c": key.checkpoint, "l": key.layer, "h": key.hook,
                                            "p": float(key.percentile)})
    return dict(zip(rows.column("region_id").to_pylist(), rows.column("token").to_pylist()))


def _drift_order(pair: dict) -> tuple:
    """Most drifted first (lowest cosine, else lowest F1), ties by region ids: one order every run."""
    score = pair["cosine"] if pair["cosine"] is not None else -pair["f1"]
    return score, pair["region_a"], pair["region_b"]


def diff_report(store_path, a: str, b: str, out: Path, models_dir: Path = Path("data/models"), top: int = 15,
                context: int = 8, cutoff: float = 0.7) -> dict:
    """``ep diff A B``: write ``out``/index.html, README.md and summary.json (matching A and B
    first when no finished match exists); return the one-line summary."""
    start = time.perf_counter()
    check_output_folder(out, "--out")
    check_options({"context": context, "top": top})
    store = Store(store_path)
    ka, kb = DictionaryKey.parse(a), DictionaryKey.parse(b)
    meta, db = current_match(store, a, b, cutoff)
    steps = step_series(db, ka, kb, models_dir)
    out.mkdir(parents=True, exist_ok=True)
    changes = region_changes(db, meta, ka, kb, top, context)
    finding = _finding(changes["enrichment"])
    context_data = {"a": str(ka), "b": str(kb), "meta": meta, "images": _plots(meta, steps, ka, cutoff, out),
                    "cutoff": cutoff, **changes, "steps": steps, "finding": finding,
                    "evals": eval_links(out, [ka, kb])}
    html = environment().get_template("diff.html.j2").render(**context_data)
    (out / "index.html").write_text(html, encoding="utf-8")
    markdown = environment(html=False).get_template("diff.md.j2").render(**context_data)
    (out / "README.md").write_text(markdown, encoding="utf-8")
    summary = {"a": str(ka), "b": str(kb), "preserved": meta["preserved"], "introduced": meta["introduced"],
               "dropped": meta["dropped"], "finding": finding, "out": str(out / "index.html"),
               "seconds": round(time.perf_counter() - start, 3)}
    jsonio.write(out / "summary.json", {**summary, "enrichment": changes["enrichment"], "steps": steps})
    return summary


def current_match(store: Store, a: str, b: str, cutoff: float) -> tuple[dict, StoreDB]:
    """The meta of the finished match of A and B (run now when there is none) and a StoreDB in
    which it is current. UsageError when its token flows pair other documents (issue 18, A3),
    or it was computed from other builds than the published ones (issue 18, A1)."""
    ka, kb = DictionaryKey.parse(a), DictionaryKey.parse(b)
    files = store.match_files(ka, kb)
    if not files.finished:
        match(MatchConfig(a, b, cutoff=cutoff), store)
    meta = store.read_json(files.meta)
    if meta.get("membership_by") is not None:  # token flows pair both streams (issue 18, A3)
        require_same_stream(store, ka.activations, kb.activations, f"diff of {ka} and {kb} (its token flows)",
                            f"or rematch by vector only: ep match {ka} {kb} --method vector")
    db = StoreDB(store)
    db.require(ka)
    db.require(kb)
    db.require_current_match(meta)  # never pair a match with other builds (issue 18, A1)
    return meta, db


def region_changes(db: StoreDB, meta: dict, ka: DictionaryKey, kb: DictionaryKey, top: int, context: int) -> dict:
    """The report's sections from the match: introduced and dropped regions (largest first, with
    contexts), the most drifted preserved pairs, token flows and label enrichment by status."""
    pairs = db.query("SELECT * FROM matches WHERE a = $a AND b = $b ORDER BY status, region_a, region_b", {"a": str(ka), "b": str(kb)}).to_pylist()
    sizes_a, sizes_b = region_sizes(db, ka), region_sizes(db, kb)
    introduced = sorted((p["region_b"] for p in pairs if p["status"] == "introduced"), key=lambda r: (-sizes_b.get(r, 0), r))
    dropped = sorted((p["region_a"] for p in pairs if p["status"] == "dropped"), key=lambda r: (-sizes_a.get(r, 0), r))
    preserved = [p for p in pairs if p["status"] == "preserved"]
    ex_a, ex_b = exemplar_tokens(db, ka), exemplar_tokens(db, kb)
    drifted = [{**p, "token_a": ex_a.get(p["region_a"]), "token_b": ex_b.get(p["region_b"])}
               for p in sorted(preserved, key=_drift_order)[:top]]

    membership = meta.get("membership_by") is not None
    transitions = ask_pair(db, ka, kb, "transition_summary").to_pylist() if membership else []
    flows = ask_pair(db, ka, kb, "transitions", limit=top).to_pylist() if membership else []
    for f in flows:
        f["token_a"], f["token_b"] = ex_a.get(f["region_a"]), ex_b.get(f["region_b"])

    meta_b = db.store.info(db.store.activation_path(kb.activations)).meta
    db.register_table("span_labels", dataset_span_labels(meta_b))
    enrichment = {r["status"]: r for r in ask_pair(db, ka, kb, "label_enrichment").to_pylist()}
    return {"introduced": region_entries(db, kb, introduced[:top], sizes_b, context), "n_introduced": len(introduced),
            "dropped": region_entries(db, ka, dropped[:top], sizes_a, context), "n_dropped": len(dropped),
            "drifted": drifted, "transitions": transitions, "flows": flows, "enrichment": enrichment}


def _plots(meta: dict, steps: list[dict], ka: DictionaryKey, cutoff: float, out: Path) -> dict[str, str]:
    """The histogram of matched cosines and the counts against training step, where there are any."""
    images = {}
    cosines = meta.get("matched_cosines", [])
    if cosines:
        import numpy as np

        counts, edges = np.histogram(cosines, bins=40, range=(-0.2, 1.0))
        images["cosines"] = plots.bar_histogram(edges[:-1], counts, edges[1] - edges[0], out / "cosines.png",
                                                "matched exemplar cosines", "cosine", "pairs", vline=cutoff)
    if len(steps) > 1:
        images["steps"] = plots.lines([s["step"] for s in steps],
                                      {"preserved": [s["preserved"] for s in steps],
                                       "introduced": [s["introduced"] for s in steps]},
                                      out / "steps.png", f"{ka} vs fine-tuning steps", "training step", "regions")
    return images


def _finding(enrichment: dict) -> dict:
    """Introduced vs preserved: share of members in chat markers or refusal text, and their ratio."""
    intro = enrichment.get("introduced", {}).get("labelled_share")
    kept = enrichment.get("preserved", {}).get("labelled_share")
    ratio = round(intro / kept, 2) if intro is not None and kept else None
    return {"introduced_share": intro, "preserved_share": kept, "enrichment": ratio}

