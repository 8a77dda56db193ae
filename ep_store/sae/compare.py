"""EP regions against SAE features on held-out tokens: shared features (F1) and build compute (issue 11).

    ep sae compare --dictionary gemma-3-270m/base/L6/p1 --sae topk-8x --store data/store --out DIR

Protocol (paper, "EP vs SAE"; DESIGN.md): each SAE feature and each EP region, scored by
its signed projection ``(x - c).e_k``, is binarised as its top-100 tokens among those with
activation > 0, eligible with >= 20 of them; F1 of each EP region with its best SAE feature
and the reverse, plus a one-to-one Hungarian match on F1 (scipy). Headline: the share of
eligible EP regions whose best SAE match has F1 > 0.5 (and the reverse share).

Unlike the paper, which compared on its build tokens, this compares on the activation
dataset's last ``heldout_tokens`` rows, which neither side was trained on: the SAE's
training rows are checked against its meta.json, and the EP side is built afresh on the
same training prefix with the stored dictionary's own parameters (p, calibration and build
batch sizes), because the stored dictionary normally streams the whole dataset. When the
stored dictionary stayed within the prefix the two are the same (the builder is exact).
That build is also timed here, for the compute comparison. No example on both sides (issue
18, A4): of those last rows only the documents with no row in the prefix and whose text
matches no prefix document's are compared on (``evaluate.splits.heldout_rows``); a document
straddling the boundary and copies of training documents are dropped and counted.

Writes ``sae_compare/<model>/<checkpoint>/L<layer>/p<p>/<sae>/`` in the store
(``sae_activations.lance``, ``ep_projections.lance``, ``ep_exemplars.lance``,
``meta.json``; SQL views ``sae_activations``, ``ep_projections``, ``sae_features``) and,
under ``--out``, ``metrics.json``, ``pairs.csv``, ``f1_distribution.png`` and ``README.md``.
The overlaps come from DuckDB (``queries/sae_f1.sql``) and are checked against the numpy
reference (``ep_store.sae.binarise``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

import ep_store
from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError
from ep_store.evaluate.splits import HeldOutRows, heldout_rows
from ep_store.kernels.calibrate import unit_directions
from ep_store.kernels.leader import LeaderBuilder, LeaderState
from ep_store.keys import DictionaryKey, SAEKey
from ep_store.sae import binarise as B
from ep_store.sae.report import compute_comparison, write_outputs
from ep_store.sae.train import encode, external_sae_inputs, load_sae
from ep_store.stages import models
from ep_store.stages.build import BuildConfig, calibrate_stream
from ep_store.stages.models import resolve_device
from ep_store.stages.vectors import stream_vectors
from ep_store.store import SAECompareFiles, Store, arrow_to_tensor, vectors_to_arrow
from ep_store.store.streams import FINGERPRINT_KEY as CORPUS_FINGERPRINT
from ep_store.store.streams import stream_identity

log = logging.getLogger(__name__)

READ_ROWS = 2048


@dataclass
class SAECompareConfig:
    dictionary: str
    """EP dictionary key <model>/<checkpoint>/L<layer>/p<p>; its activations are the SAE's."""
    sae: str | None
    """Name of an SAE trained on the same activation dataset (ep sae train --name); or None with ``sae_path``."""
    out: str
    """Folder for metrics.json, pairs.csv, f1_distribution.png and README.md."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    sae_path: str | None = None
    """Any SAELens SAE folder (e.g. a Gemma Scope release downloaded, or ep export saelens) instead of a
    trained one; its training tokens are unknown, so the held-out rows are simply the last ones (issue 21)."""
    heldout_tokens: int = 4000
    """Compare on the dataset's last this-many rows (must lie outside the SAE's training rows)."""
    top_n: int = 100
    """Binarise each feature as its top-n positive tokens (paper: 100)."""
    min_positives: int = 20
    """Eligible features have at least this many positive tokens (paper: 20)."""
    f1_threshold: float = 0.5
    """Headline: share of features whose best match has F1 above this (paper: 0.5)."""
    top_pairs: int = 20
    """Matched pairs shown with their top tokens."""
    device: str = "auto"
    """auto, cpu or cuda."""
    probe: bool = False
    """Also sparse-probe SAE, EP and raw pooled features on the built-in probe tasks (issue 10's probe)."""
    models_dir: str = "data/models"
    """Where the probe finds the model to run the probe texts through."""
    probe_data: str = "builtin"
    """Probe tasks: builtin, built-in task names, or a .jsonl/.csv/.parquet file with text and label (issue 10)."""

    def __post_init__(self):
        if (self.sae is None) == (self.sae_path is None):
            raise UsageError("give one of --sae (a trained SAE's name) or --sae-path (a SAELens folder)")
        if self.sae_path is not None:  # its comparison's folder name: one per folder, never shared by two
            resolved = str(Path(self.sae_path).resolve())
            self.sae = f"path-{Path(resolved).name or 'sae'}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
        if self.top_n < 1 or self.min_positives < 1 or self.top_pairs < 0:
            raise UsageError("--top-n and --min-positives must be at least 1, --top-pairs at least 0")
        if self.min_positives > self.top_n:
            raise UsageError(f"--min-positives {self.min_positives} cannot exceed --top-n {self.top_n}")
        if self.heldout_tokens < self.top_n:
            raise UsageError(f"--heldout-tokens {self.heldout_tokens} is too few: at least --top-n ({self.top_n}) "
                             "held-out tokens are needed to binarise a feature")
        if not 0 <= self.f1_threshold <= 1:
            raise UsageError("--f1-threshold must lie in [0, 1]")

    @property
    def key(self) -> DictionaryKey:
        return DictionaryKey.parse(self.dictionary)

    @property
    def sae_key(self) -> SAEKey:
        k = self.key
        return SAEKey(k.model, k.checkpoint, k.layer, self.sae, k.hook)


# -- inputs -----------------------------------------------------------------------------------------
def check_inputs(cfg: SAECompareConfig, store: Store) -> tuple[dict, dict, int, int]:
    """(dictionary meta as its published snapshot gives it, SAE meta, first held-out row, dataset rows);
    UsageError on any mismatch (an unknown dictionary included)."""
    key, skey = cfg.key, cfg.sae_key
    dmeta = store.dictionary_snapshot(key).meta  # the published build's meta (issue 18, A1)
    if cfg.sae_path is not None:
        return (dmeta, *external_sae_inputs(cfg.sae_path, key, cfg.heldout_tokens, store))
    sae_files = store.sae_files(skey)
    if not sae_files.finished:
        others = [str(k) for k in store.list_saes() if k.name == cfg.sae]
        hint = f"; an SAE of that name exists for {', '.join(others)}: compare it with a dictionary of the " \
               "same model, checkpoint and layer" if others else "; run ep sae train first"
        raise UsageError(f"no SAE {skey} in {store.root}{hint}")
    smeta = store.read_json(sae_files.meta)
    source = store.activation_path(key.activations)
    info = store.info(source)
    if smeta["d_in"] != info.width or dmeta["width"] != info.width:
        raise UsageError(f"width mismatch: {key.activations} has width {info.width}, the SAE {skey} takes "
                         f"{smeta['d_in']} and the dictionary {key} has {dmeta['width']}")
    check_trained_stream(store, key, skey, smeta)
    start = info.rows - cfg.heldout_tokens
    trained_until = smeta["activations"]["train_rows"][1]
    if start < trained_until:
        raise UsageError(f"too few held-out tokens: {key.activations} has {info.rows} rows and the SAE trained on the "
                         f"first {trained_until}, leaving {info.rows - trained_until}; lower --heldout-tokens to at "
                         f"most that or retrain with ep sae train --heldout-tokens {cfg.heldout_tokens}")
    if start < 2:
        raise UsageError(f"{key.activations} has {info.rows} rows: nothing is left to build EP on")
    if cfg.probe:  # the probe runs texts through the model: find it before anything is written
        from ep_store.evaluate.tasks import probe_tasks

        models.load_config(key.model, key.checkpoint, Path(cfg.models_dir))
        probe_tasks(cfg.probe_data)
    return dmeta, smeta, start, info.rows


# -- EP on the training prefix ------------------------------------------------------------------------
def check_trained_stream(store: Store, key: DictionaryKey, skey: SAEKey, smeta: dict) -> None:
    """Refuse (UsageError) to compare an SAE on rows of other documents than it was trained on:
    its training rows and the held-out rows must come from one harvest of one corpus (the
    dataset's corpus fingerprint now equals the one recorded at training; issue 18, A3)."""
    now = stream_identity(store, key.activations)
    recorded = smeta["activations"].get(CORPUS_FINGERPRINT)
    retrain = f"retrain it: ep sae train --activations {key.activations} --name {skey.name} ... --overwrite"
    if now[CORPUS_FINGERPRINT] is None:
        raise UsageError(f"{key.activations} was harvested before corpus fingerprints were recorded, so the SAE "
                         f"{skey}'s training rows cannot be shown to be of its documents; re-harvest it with "
                         f"--overwrite, then {retrain}")
    if recorded is None:
        raise UsageError(f"the SAE {skey} was trained before corpus fingerprints were recorded, so its training rows "
                         f"cannot be shown to be of the documents {key.activations} holds now; {retrain}")
    if recorded != now[CORPUS_FINGERPRINT]:
        raise UsageError(f"the SAE {skey} was trained on other documents (corpus {smeta['activations'].get('corpus')!r})"
                         f" than {key.activations} holds now (corpus {now['corpus']!r}); {retrain}")


def build_on_prefix(store: Store, key: DictionaryKey, dmeta: dict, rows: int, device: torch.device) -> dict:
    """Calibrate and leader-cluster the first ``rows`` rows with the stored dictionary's parameters.

    Returns center_D, theta, state (LeaderState), seconds, flops (calibration + screening) and tokens.
    FLOPs: center pass 4 N D; percentile pass 2 B^2 D per calibration batch; screening as the builder counts it.
    """
    b = dmeta["build"]
    cfg = BuildConfig(key.model, key.checkpoint, key.layer, key.percentile, hook=key.hook,
                      calibration_tokens=min(b["calibration_tokens"], rows), calibration_batch=b["calibration_batch"],
                      batch_size=b["batch_size"], saturation_window=b["saturation_window"], max_tokens=rows,
                      skip_nonfinite=b["skip_nonfinite"])
    source = store.activation_path(key.activations)
    start, cpu_start = time.perf_counter(), time.process_time()
    cal = calibrate_stream(store, source, cfg)
    builder = LeaderBuilder(cal.theta, cfg.batch_size, cfg.saturation_window, LeaderState(width=cal.center_D.shape[0]),
                            device, "auto")  # exact either way (float64 re-checks); bf16 only where native
    center = cal.center_D.to(device)
    for x, source_rows in stream_vectors(store, source, max(cfg.batch_size, 16384), rows, cfg.skip_nonfinite):
        if builder.state.stop_reason is not None:
            break
        builder.feed(unit_directions(x.to(device), center), source_rows)
    state = builder.finish("end_of_stream")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    n_cal, d = cal.tokens, cal.center_D.shape[0]
    full, last = divmod(n_cal, cfg.calibration_batch)
    cal_flops = 4.0 * n_cal * d + 2.0 * d * (full * cfg.calibration_batch ** 2 + last ** 2)
    return {"center_D": cal.center_D, "theta": cal.theta, "state": state, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "flops": cal_flops + builder.screen_flops, "calibration_flops": cal_flops,
            "screen_flops": builder.screen_flops, "calibration_tokens": n_cal, "tokens": state.tokens}


# -- held-out pass --------------------------------------------------------------------------------------
def heldout_selection(store: Store, key: DictionaryKey, start: int, cfg: SAECompareConfig) -> HeldOutRows:
    """The rows from ``start`` on whose documents share no example with the rows before it
    (issue 18, A4). Raises UsageError when fewer than ``--top-n`` of them are left."""
    table = store.read_table(store.activation_path(key.activations), ["doc_id", "pos", "token"])
    held = heldout_rows(table.column("doc_id").to_numpy(), table.column("pos").to_numpy(),
                        table.column("token").to_pylist(), start)
    kept = int(held.keep_M.sum())
    if kept < cfg.top_n:
        raise UsageError(f"too few held-out tokens: of {key.activations}'s last {cfg.heldout_tokens} rows only {kept} "
                         f"are of documents with no training row and no copy among the training documents "
                         f"({held.straddling} straddle the boundary, {held.copies} are copies), fewer than --top-n "
                         f"{cfg.top_n}; retrain the SAE with a larger ep sae train --heldout-tokens and pass it here")
    return held


def heldout_pass(store: Store, key: DictionaryKey, sae, ep: dict, start: int, keep_M: np.ndarray,
                 cfg: SAECompareConfig, device: torch.device, progress: bool) -> dict:
    """Stream the held-out rows once: SAE non-zeros (all) and EP projections (top-n per region).

    ``keep_M`` (bool, one per row from ``start`` on) marks the rows compared on (``heldout_selection``).
    """
    source = store.activation_path(key.activations)
    E = ep["state"].exemplars_KD.to(device)
    center = ep["center_D"].to(device)
    top = B.TopPositive(E.shape[0], cfg.top_n)
    doc, pos, tok, feats, fdoc, fpos, fval = [], [], [], [], [], [], []
    skipped, row, offset = 0, 0, 0
    bar = tqdm(total=cfg.heldout_tokens, unit="tok", desc=f"compare {key}", disable=not progress)
    for batch in store.scan(source, columns=["doc_id", "pos", "token", "vector"], batch_size=READ_ROWS, offset=start):
        x = arrow_to_tensor(batch.column("vector"))
        keep = keep_M[offset:offset + batch.num_rows]
        offset += batch.num_rows
        ok = torch.isfinite(x).all(dim=1).numpy()
        skipped += int((keep & ~ok).sum())
        finite = keep & ok
        x = x[torch.from_numpy(finite)].to(device)
        d = batch.column("doc_id").to_numpy()[finite]
        p = batch.column("pos").to_numpy()[finite]
        doc.append(d)
        pos.append(p)
        tok += [t for t, ok in zip(batch.column("token").to_pylist(), finite) if ok]
        top.add((x - center) @ E.T, row)
        a = encode(sae, x)
        r, f = a.nonzero(as_tuple=True)
        feats.append(f.cpu().numpy())
        fdoc.append(d[r.cpu().numpy()])
        fpos.append(p[r.cpu().numpy()])
        fval.append(a[r, f].float().cpu().numpy())
        row += x.shape[0]
        bar.update(batch.num_rows)
    bar.close()
    doc, pos = np.concatenate(doc), np.concatenate(pos)
    col, erow, evalue = top.rows()
    return {"doc_id": doc, "pos": pos, "token": tok, "skipped_nonfinite": skipped,
            "sae": B.Sparse(np.concatenate(feats), np.concatenate(fdoc), np.concatenate(fpos), np.concatenate(fval)),
            "ep": B.Sparse(col, doc[erow], pos[erow], evalue), "ep_positives": top.positives_K.numpy()}


def write_tables(store: Store, files: SAECompareFiles, held: dict, ep: dict) -> None:
    sae, epr = held["sae"], held["ep"]
    store.write_table(files.sae_activations, pa.table({
        "doc_id": pa.array(sae.doc_id, pa.int64()), "pos": pa.array(sae.pos, pa.int32()),
        "feature_id": pa.array(sae.feature, pa.int32()), "activation": pa.array(sae.value, pa.float32())}))
    store.write_table(files.ep_projections, pa.table({
        "doc_id": pa.array(epr.doc_id, pa.int64()), "pos": pa.array(epr.pos, pa.int32()),
        "region_id": pa.array(epr.feature, pa.int32()), "projection": pa.array(epr.value, pa.float32())}))
    state = ep["state"]
    store.write_table(files.ep_exemplars, pa.table({
        "region_id": pa.array(np.arange(state.regions), pa.int32()),
        "exemplar": vectors_to_arrow(state.exemplars_KD.numpy(), np.float32),
        "member_count": pa.array(state.member_count_K.numpy(), pa.int64()),
        "source_row": pa.array(state.source_row_K.numpy(), pa.int64()),
        "heldout_positives": pa.array(held["ep_positives"], pa.int64())}))


# -- overlaps -----------------------------------------------------------------------------------------
def sql_overlaps(store: Store, key: DictionaryKey, sae_name: str, cfg: SAECompareConfig) -> B.Overlaps:
    """The F1 table of one comparison, from DuckDB (queries/sae_f1.sql)."""
    from ep_store.sql.db import StoreDB, ask

    db = StoreDB(store)
    table = ask(db, key, "sae_f1", top_n=cfg.top_n, min_positives=cfg.min_positives).to_pydict()
    mine = np.array([s == sae_name for s in table["sae"]], dtype=bool)
    col = {k: np.asarray(v)[mine] if len(v) else np.zeros(0) for k, v in table.items()}
    return B.Overlaps(col["region_id"].astype(np.int64), col["feature_id"].astype(np.int64), col["overlap"],
                      col["region_size"], col["feature_size"], col["f1"])


def same_overlaps(a: B.Overlaps, b: B.Overlaps) -> bool:
    def rows(o):
        order = np.lexsort((o.b, o.a))
        return np.stack([o.a[order], o.b[order], o.overlap[order], o.f1[order]], 1)
    ra, rb = rows(a), rows(b)
    return ra.shape == rb.shape and bool(np.allclose(ra, rb, rtol=0, atol=1e-12))


def summarise(ov: B.Overlaps, ep_sets: B.Binarised, sae_sets: B.Binarised, threshold: float) -> dict:
    """Best-match F1 both ways, the headline shares, and the Hungarian one-to-one match."""
    ep_ids, sae_ids = np.unique(ep_sets.feature), np.unique(sae_sets.feature)
    ep_best = B.best_f1(ep_ids, ov.a, ov.f1)
    sae_best = B.best_f1(sae_ids, ov.b, ov.f1)
    ha, hb, hf = B.hungarian(ov)
    return {
        "ep_ids": ep_ids, "sae_ids": sae_ids, "ep_best_f1": ep_best, "sae_best_f1": sae_best,
        "ep_best_partner": B.best_partner(ep_ids, ov.a, ov.b, ov.f1),
        "sae_best_partner": B.best_partner(sae_ids, ov.b, ov.a, ov.f1),
        "hungarian": (ha, hb, hf),
        "ep_to_sae_share_f1_gt_05": _share(ep_best, threshold), "sae_to_ep_share_f1_gt_05": _share(sae_best, threshold),
        "hungarian_share_of_ep_f1_gt_05": float((hf > threshold).sum() / len(ep_ids)) if len(ep_ids) else None,
        "hungarian_pairs_f1_gt_05": int((hf > threshold).sum()),
    }


def _share(best: np.ndarray, threshold: float) -> float | None:
    return float((best > threshold).mean()) if len(best) else None


# -- the command --------------------------------------------------------------------------------------
def _load_sae(cfg: SAECompareConfig, store: Store, device: torch.device):
    """The compared SAE: from ``--sae-path`` with SAELens's loader, else the trained one in the store."""
    if cfg.sae_path is not None:
        from sae_lens import SAE

        return SAE.load_from_disk(cfg.sae_path, device=str(device))
    return load_sae(store, cfg.sae_key, device=str(device))[0]


def compare(cfg: SAECompareConfig, store: Store, progress: bool = True) -> dict:
    """Run one EP-vs-SAE comparison; returns the summary written to ``out/metrics.json``."""
    key, skey = cfg.key, cfg.sae_key
    dmeta, smeta, start, rows = check_inputs(cfg, store)
    selected = heldout_selection(store, key, start, cfg)
    device = resolve_device(cfg.device)
    sae = _load_sae(cfg, store, device)
    ep = build_on_prefix(store, key, dmeta, start, device)
    held = heldout_pass(store, key, sae, ep, start, selected.keep_M, cfg, device, progress)
    files = store.sae_compare_files(key, cfg.sae)
    store.remove(files.meta)  # not listed (no SQL views) until complete again
    write_tables(store, files, held, ep)
    store.write_json(files.meta, {"dictionary": str(key), "sae": cfg.sae_path or str(skey), "heldout_rows": [start, rows],
                                  "config": asdict(cfg), "ep_store_version": ep_store.__version__,
                                  ENVIRONMENT_KEY: environment(device)})  # issue 18, E14.1
    ep_sets = B.binarise(held["ep"], cfg.top_n, cfg.min_positives)
    sae_sets = B.binarise(held["sae"], cfg.top_n, cfg.min_positives)
    reference = B.overlaps(ep_sets, sae_sets)
    ov = sql_overlaps(store, key, cfg.sae, cfg)
    agree = same_overlaps(ov, reference)
    if not agree:
        log.warning("SQL and numpy F1 tables differ for %s vs %s; reporting the numpy reference", key, skey)
        ov = reference
    s = summarise(ov, ep_sets, sae_sets, cfg.f1_threshold)
    metrics = {
        "dictionary": str(key), "sae": cfg.sae_path or str(skey), "heldout_rows": [start, rows],
        "heldout_tokens": int(len(held["doc_id"])), "skipped_nonfinite": held["skipped_nonfinite"],
        "heldout_dropped": {"straddling": selected.straddling, "copies": selected.copies},  # issue 18, A4
        "ep_to_sae_share_f1_gt_05": s["ep_to_sae_share_f1_gt_05"],
        "sae_to_ep_share_f1_gt_05": s["sae_to_ep_share_f1_gt_05"],
        "hungarian_pairs_f1_gt_05": s["hungarian_pairs_f1_gt_05"],
        "hungarian_share_of_ep_f1_gt_05": s["hungarian_share_of_ep_f1_gt_05"],
        "f1_threshold": cfg.f1_threshold,
        "eligible": {"ep_regions": len(s["ep_ids"]), "sae_features": len(s["sae_ids"]),
                     "ep_regions_total": ep["state"].regions, "sae_features_total": smeta["width"]},
        "ep_mean_best_f1": _mean(s["ep_best_f1"]), "sae_mean_best_f1": _mean(s["sae_best_f1"]),
        "sql_matches_numpy": agree,
        "ep_dictionary": {
            "built_on_rows": [0, start], "regions": ep["state"].regions, "theta": ep["theta"],
            "stored_regions": dmeta["regions"], "stored_tokens": dmeta["tokens"],
            "stored_saw_heldout": dmeta["tokens"] > start,
            "note": "EP rebuilt on the training prefix with the stored dictionary's parameters; the stored "
                    "dictionary is used only for those parameters" if dmeta["tokens"] > start else
                    "the stored dictionary stayed within the training prefix; the rebuild equals it"},
        "compute": compute_comparison(ep, smeta) if cfg.sae_path is None else None,  # unknown training run
        "protocol": {"binarisation": f"top-{cfg.top_n} tokens with activation > 0, eligible with >= "
                     f"{cfg.min_positives}", "ep_score": "signed projection (x - c).e_k",
                     "tokens": "held-out: the dataset's last rows, used by neither the SAE's training nor the EP build, "
                               "less documents with rows in the training prefix or a copy there (the paper compared "
                               "on its build tokens)"},
        "config": asdict(cfg),
    }
    if cfg.probe:
        from ep_store.sae.probe import probe_comparison

        metrics["probe"] = probe_comparison(key, ep["center_D"], ep["theta"], ep["state"].exemplars_KD, sae,
                                            Path(cfg.models_dir), cfg.device, cfg.probe_data, progress)
    metrics |= write_outputs(Path(cfg.out), metrics, s, held, cfg.top_pairs, ep_sets, sae_sets)
    return metrics


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None
