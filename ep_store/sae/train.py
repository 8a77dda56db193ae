"""Train a TopK sparse autoencoder on an activation dataset of the store, with SAELens (issue 11).

    ep sae train --activations gemma-3-270m/base/L6 --name topk-8x --store data/store

SAELens's own ``SAETrainer`` runs the training loop; ep_store only feeds it: batches of
the dataset's first ``rows - heldout_tokens`` rows, read from Lance in chunks, shuffled in
a bounded buffer, epoch after epoch until ``tokens`` samples are consumed (memory is the
buffer, never the dataset). The last ``heldout_tokens`` rows are never read here: they are
what ``ep sae compare`` evaluates on, less the documents that also have training rows or
copy a training document's text (issue 18, A4: ``evaluate.splits.heldout_rows``). Inputs are scaled by SAELens's
``expected_average_only_in`` normalisation, which SAELens folds back into the weights at
the end, so the saved SAE encodes raw activations.

Writes ``saes/<model>/<checkpoint>/L<layer>/<name>/``: SAELens's ``cfg.json`` and
``sae_weights.safetensors`` (``sae_lens.SAE.load_from_disk`` opens the folder unchanged)
and ep_store's ``meta.json`` (library, version, config, tokens, wall time, FLOPs estimate,
training curves). Rows with NaN/inf (Gemma's layer 12 has a few) are skipped and counted.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from unittest import mock

import torch
from tqdm import tqdm

from ep_store.environment import ENVIRONMENT_KEY, environment
from ep_store.errors import UsageError, require
from ep_store.keys import ActivationKey, DictionaryKey, SAEKey, hook_name
from ep_store.stages.models import resolve_device
from ep_store.store import Files, Store, arrow_to_tensor
from ep_store.store.streams import stream_identity

log = logging.getLogger(__name__)

READ_ROWS = 8192  # rows per Lance read


@dataclass
class SAETrainConfig:
    activations: str
    """Activation dataset key <model>/<checkpoint>/L<layer>."""
    name: str
    """Name of the SAE (a path segment under saes/<model>/<checkpoint>/L<layer>/)."""
    _: KW_ONLY  # the rest by keyword only: positional options landed in the wrong field (issue 18, D10)
    width: int | None = None
    """Number of SAE features (default: 8 x d_model)."""
    k: int = 32
    """Active features per token (TopK)."""
    tokens: int = 200_000
    """Training samples consumed, counting repeats over epochs of the training rows."""
    heldout_tokens: int = 4000
    """The dataset's last rows, never read in training (ep sae compare evaluates on them)."""
    batch_size: int = 512
    """Activations per optimiser step."""
    lr: float = 1e-3
    """Adam learning rate (SAELens SAETrainerConfig.lr), constant after warm-up."""
    lr_warm_up_steps: int = 20
    """Linear warm-up steps."""
    shuffle_rows: int = 16384
    """Rows held in the shuffle buffer: the memory bound of the stream."""
    dead_window_tokens: int = 20_000
    """A feature is dead when it has not fired for this many training tokens."""
    log_every: int = 10
    """Record the training curves every this many steps."""
    monitor_tokens: int = 2048
    """Training rows (the first ones) on which the curves are measured."""
    seed: int = 0
    """Seed of the SAE initialisation and the shuffle."""
    device: str = "auto"
    """auto, cpu or cuda."""
    overwrite: bool = False
    """Replace an existing SAE of the same name."""

    def __post_init__(self):
        for name in ("k", "tokens", "batch_size", "shuffle_rows", "dead_window_tokens",
                     "log_every", "monitor_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.heldout_tokens < 0 or self.lr_warm_up_steps < 0:
            raise UsageError("--heldout-tokens and --lr-warm-up-steps must be at least 0")
        if self.width is not None and self.width < self.k:
            raise UsageError(f"--width {self.width} must be at least --k {self.k}")
        if not self.lr > 0:
            raise UsageError("--lr must be positive")
        if self.shuffle_rows < self.batch_size:
            raise UsageError("--shuffle-rows must be at least --batch-size")

    @property
    def key(self) -> SAEKey:
        a = ActivationKey.parse(self.activations)
        return SAEKey(a.model, a.checkpoint, a.layer, self.name, a.hook)


# -- streaming training batches ---------------------------------------------------------------------
def training_batches(store: Store, path: Path, rows: int, batch_size: int, shuffle_rows: int,
                     seed: int) -> Iterator[torch.Tensor]:
    """Endless (batch_size, D) float32 batches of the first ``rows`` rows, reshuffled every epoch.

    Reads ``READ_ROWS`` at a time into a buffer of at most ``shuffle_rows + READ_ROWS`` rows;
    non-finite rows are dropped. Raises UsageError if the rows hold no finite vector.
    """
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        buffer, held, emitted = [], 0, 0
        for batch in store.scan(path, columns=["vector"], batch_size=READ_ROWS, limit=rows):
            x = arrow_to_tensor(batch.column("vector"))
            x = x[torch.isfinite(x).all(dim=1)]
            buffer.append(x)
            held += x.shape[0]
            if held >= shuffle_rows:
                out, rest = _shuffled_batches(torch.cat(buffer), batch_size, gen)
                yield from out
                emitted += len(out)
                buffer, held = [rest], rest.shape[0]
        if held:
            out, rest = _shuffled_batches(torch.cat(buffer), batch_size, gen)
            yield from out
            emitted += len(out)
            if rest.shape[0]:  # the epoch's last partial batch: padded from its own rows
                yield torch.cat([rest, rest[torch.randint(rest.shape[0], (batch_size - rest.shape[0],),
                                                          generator=gen)]])
                emitted += 1
        if emitted == 0:
            raise UsageError(f"{path} has no finite vectors in its first {rows} rows; harvest more tokens")
        epoch += 1
        log.debug("epoch %d of the training rows done", epoch)


def training_stats(store: Store, path: Path, rows: int) -> tuple[torch.Tensor, float]:
    """(mean activation (D,), mean L2 norm) of the finite vectors among the first ``rows`` rows, in float64."""
    total, norms, n = None, 0.0, 0
    for batch in store.scan(path, columns=["vector"], batch_size=READ_ROWS, limit=rows):
        x = arrow_to_tensor(batch.column("vector"), torch.float64)
        x = x[torch.isfinite(x).all(dim=1)]
        total = x.sum(0) if total is None else total + x.sum(0)
        norms += float(x.norm(dim=1).sum())
        n += x.shape[0]
    if not n:
        raise UsageError(f"{path} has no finite vectors in its first {rows} rows; harvest more tokens")
    return (total / n).to(torch.float32), norms / n


def _shuffled_batches(x: torch.Tensor, batch_size: int, gen: torch.Generator):
    x = x[torch.randperm(x.shape[0], generator=gen)]
    full = x.shape[0] // batch_size * batch_size
    return (list(x[:full].split(batch_size)) if full else []), x[full:]


class CurveRecorder:
    """The iterator SAETrainer.fit pulls batches from; it measures the SAE before each logged step.

    MSE is per element in the input's units; explained variance is 1 - sum |x - x_hat|^2 /
    sum |x - mean x|^2 over the monitor rows; dead fraction is SAELens's own dead-feature mask.
    """

    def __init__(self, batches: Iterator[torch.Tensor], monitor_ND: torch.Tensor, every: int):
        self.batches, self.monitor, self.every = batches, monitor_ND, every
        self.trainer = None
        self.points: list[dict] = []

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        t = self.trainer
        if t is not None and t.n_training_steps % self.every == 0 and (
                not self.points or self.points[-1]["step"] != t.n_training_steps):
            self.record()
        return next(self.batches)

    @torch.no_grad()
    def record(self) -> dict:
        t = self.trainer
        sae = t.sae
        was_training = sae.training
        sae.eval()
        x = self.monitor.to(sae.device)
        scale = t.activation_scaler.scaling_factor or 1.0
        feats = sae.encode(x * scale)
        x_hat = sae.decode(feats) / scale
        sae.train(was_training)
        err = (x_hat - x).pow(2).sum(-1)
        var = (x - x.mean(0)).pow(2).sum(-1)
        point = {"step": t.n_training_steps, "tokens": t.n_training_samples,
                 "mse": float(err.mean() / x.shape[1]), "explained_variance": float(1 - err.mean() / var.mean()),
                 "dead_fraction": float(t.dead_neurons.float().mean()), "l0": float((feats > 0).sum(-1).float().mean())}
        self.points.append(point)
        return point


# -- training -------------------------------------------------------------------------------------
def sae_training_flops(d_in: int, width: int, tokens: int) -> float:
    """Estimated training FLOPs: 6 x parameters x tokens with parameters = 2 x d_in x width.

    (Encoder and decoder are dense D x F products in SAELens's TopK SAE; backward is twice the
    forward. The TopK selection and the auxiliary dead-feature loss are left out, so this
    understates the cost slightly.)
    """
    return 6.0 * 2.0 * d_in * width * tokens


def train_sae(cfg: SAETrainConfig, store: Store, progress: bool = True, curves_path: Path | None = None) -> dict:
    """Train, save and describe one SAE; returns the run summary. Raises UsageError on bad input."""
    key = cfg.key
    source, info, train_rows = _check_inputs(cfg, store)
    folder = store.sae_dir(key)
    width = cfg.width or 8 * info.width
    device = resolve_device(cfg.device)

    require("sae_lens", "sae", "ep sae train")  # EnvError (exit 1) with the install hint (issue 18, C7)
    from sae_lens import __version__

    trainer, recorder = _trainer(cfg, store, source, info, train_rows, width, device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with _quiet_tqdm(not progress):
        trained = trainer.fit()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    final = recorder.record()

    meta = {
        "key": str(key), "model": key.model, "checkpoint": key.checkpoint, "layer": key.layer,
        **({"hook": key.hook} if key.hook != "resid_post" else {}), "name": key.name,
        "library": "sae_lens", "library_version": __version__, "architecture": "topk",
        "config": asdict(cfg) | {"width": width}, "sae_config": trained.cfg.get_inference_sae_cfg_dict(),
        "d_in": info.width, "width": width, "k": cfg.k,
        "activations": {"key": str(key.activations), "version": info.version, "rows": info.rows,
                        "train_rows": [0, train_rows], "heldout_rows": [train_rows, info.rows],
                        **stream_identity(store, key.activations)},  # compare checks it (issue 18, A3)
        "tokens": trainer.n_training_samples, "steps": trainer.n_training_steps,
        "epochs": round(trainer.n_training_samples / train_rows, 3),
        "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3), "device": str(device),
        "flops": sae_training_flops(info.width, width, trainer.n_training_samples),
        "flops_formula": "6 * (2 * d_in * width) * tokens",
        "final": final, "curves": recorder.points,
        ENVIRONMENT_KEY: environment(device, "float32"),  # issue 18, E14.1; digests skip it
    }
    _save_atomically(store, folder, trained, meta)
    if curves_path is not None:
        write_curves(recorder.points, curves_path)
    return {"sae": str(key), "path": str(folder), "tokens": meta["tokens"], "steps": meta["steps"],
            "seconds": meta["seconds"], "gflop": round(meta["flops"] / 1e9, 1),
            "explained_variance": round(final["explained_variance"], 4), "dead_fraction": round(final["dead_fraction"], 4)}


def _check_inputs(cfg: SAETrainConfig, store: Store):
    """(the activations' path, their info, rows to train on); UsageError when there are no
    activations, the SAE exists without --overwrite, or the held-out rows leave no batch."""
    key = cfg.key
    source = store.require_activations(key.activations)
    folder = store.sae_dir(key)
    if folder.exists() and not cfg.overwrite:
        raise UsageError(f"SAE {key} exists at {folder}; pass --overwrite to replace it")
    info = store.info(source)
    train_rows = info.rows - cfg.heldout_tokens
    if train_rows < cfg.batch_size:
        raise UsageError(f"{key.activations} has {info.rows} rows: after the {cfg.heldout_tokens} held-out rows "
                         f"fewer than one batch ({cfg.batch_size}) is left to train on")
    return source, info, train_rows


def _trainer(cfg: SAETrainConfig, store: Store, source: Path, info, train_rows: int, width: int, device):
    """A seeded SAELens TopK SAE (decoder bias at the training rows' mean) and its trainer, fed
    by a ``CurveRecorder`` over the shuffled training rows: (trainer, recorder)."""
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    key = cfg.key
    torch.manual_seed(cfg.seed)
    sae_cfg = TopKTrainingSAEConfig(
        d_in=info.width, d_sae=width, k=cfg.k, device=str(device), normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(model_name=key.model, hook_name=hook_name(key.layer, key.hook)))
    sae = TopKTrainingSAE(sae_cfg)
    window = max(1, cfg.dead_window_tokens // cfg.batch_size)
    steps = math.ceil(cfg.tokens / cfg.batch_size)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size, lr=cfg.lr,
        lr_end=cfg.lr, lr_warm_up_steps=min(cfg.lr_warm_up_steps, steps), device=str(device),
        dead_feature_window=window, feature_sampling_window=window, logger=LoggingConfig(log_to_wandb=False))
    mean_D, mean_norm = training_stats(store, source, train_rows)
    trainer_scale = info.width ** 0.5 / mean_norm
    with torch.no_grad():
        sae.b_dec.copy_((mean_D * trainer_scale).to(sae.b_dec.device))
    monitor = next(training_batches(store, source, min(train_rows, cfg.monitor_tokens), cfg.monitor_tokens,
                                    cfg.monitor_tokens, cfg.seed))
    recorder = CurveRecorder(training_batches(store, source, train_rows, cfg.batch_size, cfg.shuffle_rows, cfg.seed),
                             monitor, cfg.log_every)
    trainer = SAETrainer(trainer_cfg, sae, recorder)
    trainer.activation_scaler.scaling_factor = trainer_scale  # fit() then skips its sampled estimate
    recorder.trainer = trainer
    return trainer, recorder


def _save_atomically(store: Store, folder: Path, sae, meta: dict) -> None:
    """SAELens's save into a temporary sibling, then one rename: no half-written SAE is ever visible."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    store.remove(tmp)
    sae.save_inference_model(str(tmp))
    store.write_json(Files(tmp).meta, meta)  # ep_store's meta beside SAELens's files
    if folder.exists():
        store.remove(folder)
    tmp.replace(folder)


def write_curves(points: list[dict], path: Path) -> None:
    """Training curves as CSV (step, tokens, mse, explained_variance, dead_fraction, l0): a DVC plot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    tmp.replace(path)


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool):
    """SAELens draws its own tqdm bars; --no-progress silences them for the duration."""
    if not quiet:
        yield
        return
    from sae_lens.training import activation_scaler, sae_trainer

    with mock.patch.object(sae_trainer, "tqdm", functools.partial(tqdm, disable=True)), \
            mock.patch.object(activation_scaler, "tqdm", functools.partial(tqdm, disable=True)):
        yield


# -- loading --------------------------------------------------------------------------------------
def load_sae(store: Store, key: SAEKey, device: str = "cpu"):
    """(SAELens SAE, ep_store meta) of a saved SAE; the SAE comes from SAELens's own loader."""
    files = store.sae_files(key)
    if not files.finished:
        known = ", ".join(str(k) for k in store.list_saes()) or "none"
        raise UsageError(f"no SAE {key} in {store.root} (known: {known}); run ep sae train first")
    require("sae_lens", "sae", f"reading SAE {key}")
    from sae_lens import SAE

    return SAE.load_from_disk(str(files.folder), device=device), store.read_json(files.meta)


def encode(sae, x_ND: torch.Tensor) -> torch.Tensor:
    """(N, F) feature activations of raw activations (SAELens's ``encode``, no gradients)."""
    with torch.no_grad():
        return sae.encode(x_ND.to(sae.device, torch.float32))


def external_sae_inputs(sae_path: str, key: DictionaryKey, heldout_tokens: int, store: Store) -> tuple[dict, int, int]:
    """(SAE meta as far as a SAELens folder tells it, first held-out row, dataset rows) for
    ``ep sae compare --sae-path`` with the dictionary ``key``; UsageError for a
    folder SAELens cannot load, or an SAE of another width or hook (issue 21, item 1)."""
    require("sae_lens", "sae", "ep sae compare --sae-path")
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(sae_path, device="cpu")
    except Exception as err:  # noqa: BLE001 - any loader failure (safetensors, shapes, config) means "not loadable"
        raise UsageError(f"{sae_path} is not a loadable SAELens SAE folder ({err.__class__.__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    info = store.info(store.require_activations(key.activations))
    hook = getattr(sae.cfg.metadata, "hook_name", None)
    want = hook_name(key.layer, key.hook)
    if sae.cfg.d_in != info.width or (hook and hook != want):
        raise UsageError(f"the SAE in {sae_path} reads {hook or 'an unnamed hook'} of width {sae.cfg.d_in}; "
                         f"{key} is {want} of width {info.width}")
    start = info.rows - heldout_tokens
    if start < 2:
        raise UsageError(f"{key.activations} has {info.rows} rows: lower --heldout-tokens to leave rows to build EP on")
    smeta = {"d_in": sae.cfg.d_in, "width": sae.cfg.d_sae, "path": str(sae_path), "hook_name": hook}
    return smeta, start, info.rows
