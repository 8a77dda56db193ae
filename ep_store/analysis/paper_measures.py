"""What ``ep report paper`` reads from each metrics file: one ``measure_<claim>`` per claim of the
paper (ep_store.analysis.paper_figures), each taking one file's JSON, as its writer wrote it, and
returning the cell of the table, the (ours, paper) pairs its verdict compares and the numbers.

The files and the keys read (their writers):
- refusal (``ep refusal``, ep_store.studies.refusal): ``unhooked.heldout_harmful_refusal``;
  ``sweeps[].conditions[]`` with ``basis`` exemplar/mean/null, ``k`` and ``heldout_harmful_refusal``;
  ``best``; ``ceiling[]`` per layer; ``config``.
- probe (``ep eval probe --metrics``): ``<key>.all_tasks.k1``: ``retention_onehot`` (ours), or
  ``ep_onehot_accuracy`` over ``raw_accuracy`` and ``raw_topk_accuracy`` (paper: no retention).
- concepts (``ep eval concepts --metrics``): ``<key>.mean_auroc``, ``mean_auroc_diffmean``,
  ``mean_auroc_mean`` (paper protocol).
- ood (``ep eval ood --metrics``): ``<key>.<set>.within_theta_rate``, set ``random_tokens``.
- sae (``ep sae summary``, ep_store.sae.report): ``<key>~<sae>.ep_to_sae_share_f1_gt_05``.
"""

from __future__ import annotations

from typing import NamedTuple

from ep_store.analysis.paper_figures import Figure
from ep_store.errors import UsageError
from ep_store.keys import DictionaryKey, format_percentile


class Measure(NamedTuple):
    """One claim as one metrics file answers it."""

    cell: str
    """The table's cell."""
    pairs: list[tuple[float, float]]
    """(ours, the paper's) values the verdict compares."""
    values: dict
    """The numbers, for the metrics JSON."""
    model: str
    """<model>/<checkpoint> measured."""
    layers: tuple[int, ...]
    percentiles: tuple[float, ...]
    dictionaries: tuple[tuple[str, int | None], ...] = ()
    """(dictionary key, stream seed or None) whose token counts the row shows."""


def f2(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def signed(x) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def parse_key(text: str) -> DictionaryKey | None:
    try:
        return DictionaryKey.parse(text)
    except UsageError:
        return None


def label(key: DictionaryKey) -> str:
    return f"L{key.layer}/p{format_percentile(key.percentile)}"


def keyed(data: dict, suffix: bool = False) -> dict[tuple[DictionaryKey, str], dict]:
    """The entries of a metrics file named by a dictionary key (``key~name`` when ``suffix``)."""
    out = {}
    for name, value in data.items():
        head, _, tail = name.rpartition("~") if suffix else (name, "", "")
        key = parse_key(head)
        if key is not None and isinstance(value, dict):
            out[key, tail] = value
    return dict(sorted(out.items()))


def nearest(percentiles, target: float | None) -> float | None:
    """The percentile run nearest ``target`` (ties: the smaller); None: every one."""
    found = sorted(set(percentiles))
    if target is None or not found:
        return None
    return min(found, key=lambda p: (abs(p - target), p))


def at_percentile(entries: dict, target: float | None) -> dict:
    chosen = nearest([key.percentile for key, _ in entries], target)
    return {k: v for k, v in entries.items() if chosen is None or k[0].percentile == chosen}


def measured(entries: dict, parts: list[str], pairs: list, values: dict) -> Measure:
    """The Measure of the dictionaries ``entries`` picked."""
    keys = [key for key, _ in entries]
    model = ", ".join(dict.fromkeys(f"{k.model}/{k.checkpoint}" for k in keys))
    return Measure("; ".join(parts) or "no dictionary in the file", pairs, values, model,
                   tuple(sorted({k.layer for k in keys})), tuple(sorted({k.percentile for k in keys})),
                   tuple((str(k), None) for k in dict.fromkeys(keys)))


# -- evaluations ------------------------------------------------------------------------------------
def measure_concepts(data: dict, fig: Figure) -> Measure:
    """Mean AUROC of EP's best region (exemplar; mean basis where run) beside difference of means."""
    parts, pairs, values = [], [], {}
    entries = at_percentile(keyed(data), fig.percentile)
    for (key, _), m in entries.items():
        ep, mean, dm = m.get("mean_auroc"), m.get("mean_auroc_mean"), m.get("mean_auroc_diffmean")
        parts.append(f"{label(key)} EP {f2(ep)}" + (f", mean basis {f2(mean)}" if mean is not None else "")
                     + f" (diff-of-means {f2(dm)})")
        pairs += [(ep, fig.targets["mean_auroc"])] if ep is not None else []
        values[str(key)] = {"mean_auroc": ep, "mean_auroc_mean": mean, "mean_auroc_diffmean": dm}
    return measured(entries, parts, pairs, values)


def measure_probe(data: dict, fig: Figure) -> Measure:
    """EP one-hot at k = 1 against the raw probe: ``retention_onehot`` where the protocol computes
    it (ours), else EP top-1 over raw all-D and over raw top-1 (the paper's denominator is unstated)."""
    parts, pairs, values = [], [], {}
    target = fig.targets["retention_onehot"]
    entries = at_percentile(keyed(data), fig.percentile)
    for (key, _), m in entries.items():
        k1 = m.get("all_tasks", {}).get("k1", {})
        ep, raw, top = k1.get("ep_onehot_accuracy"), k1.get("raw_accuracy"), k1.get("raw_topk_accuracy")
        if "retention_onehot" in k1:
            kept = k1["retention_onehot"]
            parts.append(f"{label(key)} retention {f2(kept)} (EP top-1 {f2(ep)}, raw all-D {f2(raw)})")
            pairs += [(kept, target)] if kept is not None else []
            values[str(key)] = {"retention_onehot": kept, "ep_onehot_accuracy": ep, "raw_accuracy": raw}
            continue
        of_all, of_top = ratio(ep, raw), ratio(ep, top)
        parts.append(f"{label(key)} EP top-1 {f2(ep)}: {f2(of_all)} of raw all-D {f2(raw)}, "
                     f"{f2(of_top)} of raw top-1 {f2(top)}")
        pairs += [(r, target) for r in (of_all, of_top) if r is not None]
        values[str(key)] = {"ep_onehot_accuracy": ep, "raw_accuracy": raw, "raw_topk_accuracy": top,
                            "ep_over_raw": of_all, "ep_over_raw_topk": of_top}
    return measured(entries, parts, pairs, values)


def ratio(a, b) -> float | None:
    return None if a is None or not b else a / b


def measure_ood(data: dict, fig: Figure) -> Measure:
    """Within-theta rate of random token ids, with the in-distribution sets' beside it."""
    parts, pairs, values = [], [], {}
    entries = at_percentile(keyed(data), fig.percentile)
    for (key, _), m in entries.items():
        rates = {name: s.get("within_theta_rate") for name, s in m.items() if isinstance(s, dict)}
        rate = rates.get("random_tokens")
        parts.append(f"{label(key)} random ids {f2(rate)} (reference {f2(rates.get('reference'))}, "
                     f"held-out {f2(rates.get('heldout'))}, shuffled {f2(rates.get('shuffled'))})")
        pairs += [(rate, fig.targets["within_theta_rate"])] if rate is not None else []
        values[str(key)] = {"within_theta_rate": rates}
    return measured(entries, parts, pairs, values)


def measure_sae(data: dict, fig: Figure) -> Measure:
    """Share of eligible EP regions whose best SAE match has F1 > 0.5, every comparison."""
    parts, pairs, values = [], [], {}
    entries = keyed(data, suffix=True)
    for (key, sae), m in entries.items():
        share, back = m.get("ep_to_sae_share_f1_gt_05"), m.get("sae_to_ep_share_f1_gt_05")
        eligible = (m.get("eligible") or {}).get("ep_regions")
        parts.append(f"{label(key)} vs {sae}: {f2(share)} of {eligible} eligible regions (SAE to EP {f2(back)}; "
                     f"{m.get('heldout_tokens')} held-out tokens)")
        pairs += [(share, fig.targets["ep_to_sae_share_f1_gt_05"])] if share is not None else []
        values[f"{key}~{sae}"] = {"ep_to_sae_share_f1_gt_05": share, "sae_to_ep_share_f1_gt_05": back,
                                  "eligible_ep_regions": eligible, "heldout_tokens": m.get("heldout_tokens")}
    return measured(entries, parts, pairs, values)


# -- the refusal study --------------------------------------------------------------------------------
def refusal_measure(r: dict, cell: str, pairs: list, values: dict, sweeps: list[dict]) -> Measure:
    return Measure(cell, pairs, values, f"{r.get('model')}/{r.get('checkpoint')}",
                   tuple(sorted({s["layer"] for s in sweeps})), tuple(sorted({s["percentile"] for s in sweeps})),
                   tuple(dict.fromkeys((s["dictionary"], s.get("seed")) for s in sweeps)))


def prompts(r: dict) -> str:
    c = r.get("config", {})
    seeds = f", seeds {','.join(map(str, c['seeds']))}" if c.get("seeds") else ""
    return (f"{c.get('train_harmful')} + {c.get('train_benign')} training, {c.get('heldout_harmful')} + "
            f"{c.get('heldout_benign')} held-out prompts, greedy {c.get('max_new_tokens')} tokens{seeds}")


def measure_refusal_baseline(r: dict, fig: Figure) -> Measure:
    """The unhooked model's held-out harmful (and benign) refusal."""
    u = r.get("unhooked", {})
    harmful, benign = u.get("heldout_harmful_refusal"), u.get("heldout_benign_refusal")
    cell = f"held-out harmful {f2(harmful)}, benign {f2(benign)} ({prompts(r)})"
    pairs = [(harmful, fig.targets["heldout_harmful_refusal"])] if harmful is not None else []
    values = {"heldout_harmful_refusal": harmful, "heldout_benign_refusal": benign}
    return refusal_measure(r, cell, pairs, values, [])  # the unhooked model: no dictionary, layer or p


def k1_change(sweep: dict, basis: str, unhooked: float) -> float | None:
    """Held-out harmful refusal with the top region ablated (k = 1) in ``basis``, less unhooked's."""
    for c in sweep.get("conditions", []):
        if c["basis"] == basis and c["k"] == 1 and c.get("heldout_harmful_refusal") is not None:
            return c["heldout_harmful_refusal"] - unhooked
    return None


def measure_refusal_k1(r: dict, fig: Figure) -> Measure:
    """Per layer at the p nearest the paper's: the K=1 change in held-out harmful refusal per basis,
    averaged over the stream-order seeds."""
    unhooked = r.get("unhooked", {}).get("heldout_harmful_refusal")
    p = nearest([s["percentile"] for s in r.get("sweeps", [])], fig.percentile)
    sweeps = [s for s in r.get("sweeps", []) if s["percentile"] == p]
    parts, pairs, values = [], [], {}
    for layer in sorted({s["layer"] for s in sweeps}):
        at = [s for s in sweeps if s["layer"] == layer]
        changes = {}
        for basis in fig.targets:
            found = [x for s in at if unhooked is not None and (x := k1_change(s, basis, unhooked)) is not None]
            changes[basis] = round(sum(found) / len(found), 4) if found else None
            pairs += [(changes[basis], fig.targets[basis])] if found else []
        seeds = f" ({len(at)} seeds)" if len(at) > 1 else ""
        name = f"L{layer}/p{format_percentile(p)}"
        parts.append(f"{name}{seeds}: " + ", ".join(f"{b} {signed(v)}" for b, v in changes.items())
                     if any(v is not None for v in changes.values()) else f"{name}{seeds}: no candidate region")
        values[name] = changes
    return refusal_measure(r, "; ".join(parts) or "no sweep", pairs, values, sweeps)


def null_of(r: dict, best: dict) -> dict | None:
    """The null region's k = 1 ablation in the recommended dictionary (exemplar direction first)."""
    for s in r.get("sweeps", []):
        if s["dictionary"] == best["dictionary"] and s.get("seed") == best.get("seed"):
            nulls = [c for c in s.get("conditions", []) if c["basis"] == "null" and c["k"] == 1]
            nulls.sort(key=lambda c: c.get("direction") != "exemplar")
            return nulls[0] if nulls else None
    return None


def measure_refusal_best(r: dict, fig: Figure) -> Measure:
    """The recommended ablation, its null control and each layer's difference-of-means ceiling."""
    best = r.get("best")
    forms = (("centered", lambda c: c), ("origin", lambda c: c.get("uncentered")),
             ("prompt mean", lambda c: c.get("prompt_mean")))
    ceiling = [f"L{c['layer']} " + " / ".join(f"{name} {f2(m.get('heldout_harmful_refusal'))} "
                                             f"(x{f2(m.get('capability_ratio'))})"
                                             for name, get in forms if (m := get(c)))
               for c in r.get("ceiling") or []]
    tail = f"; diff-of-means ceiling: {', '.join(ceiling)}" if ceiling else ""
    values = {"best": best, "ceiling": r.get("ceiling") or []}
    if best is None:
        return refusal_measure(r, "no candidate region in any sweep" + tail, [], values, r.get("sweeps", []))
    null = null_of(r, best)
    values["null"] = null and {k: null.get(k) for k in ("heldout_harmful_refusal", "capability_ratio", "regions")}
    null_text = (f"null {f2(null['heldout_harmful_refusal'])} (x{f2(null.get('capability_ratio'))})" if null
                 else "null: none eligible")
    key = parse_key(best["dictionary"])
    cell = (f"best {label(key) if key else best['dictionary']} {best['basis']} k={best['k']}: harmful "
            f"{f2(best['heldout_harmful_refusal'])}, benign {f2(best['heldout_benign_refusal'])}, capability "
            f"x{f2(best['capability_ratio'])}; {null_text}{tail}")
    sweeps = [s for s in r.get("sweeps", []) if s["dictionary"] == best["dictionary"]
              and s.get("seed") == best.get("seed")]
    return refusal_measure(r, cell, [], values, sweeps)
