"""An activation dataset read as a stream of vectors: exact batches in stored order.

What a build reads (calibration and clustering, ep_store.stages.build), and what a steering
scale (ep_store.studies.intervene), an SAE comparison (ep_store.sae.compare) and the export
pipeline read: ``stream_vectors`` yields (x_ND float32, dataset rows_N) whatever the fragment
layout; ``BuildInputs`` turns it into the leader builder's unit directions on its device.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ep_store.errors import UsageError
from ep_store.kernels.calibrate import degenerate, unit_directions_
from ep_store.store import Store, arrow_to_tensor, finite_rows


def stream_vectors(store: Store, path: Path, batch_rows: int, limit: int | None = None,
                   skip_nonfinite: bool = False, version: int | None = None
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x_ND float32, dataset_rows_N) in stored order, exactly ``batch_rows`` rows per batch
    (the last may be shorter) whatever the fragment layout (issue 8, A1).

    ``limit`` counts stored rows; non-finite rows are refused (UsageError) unless
    ``skip_nonfinite``, in which case they are dropped before batching, so batches still
    hold ``batch_rows`` kept rows. ``version`` pins the dataset version read.
    """
    def keep(batch: pa.RecordBatch) -> np.ndarray:
        finite = finite_rows(batch.column("vector"))
        if not skip_nonfinite and not finite.all():
            bad = nonfinite_rows(store, path, version)
            raise UsageError(
                f"{path} has {len(bad)} non-finite or missing (null) vectors (rows {bad[:5]}{' ...' if len(bad) > 5 else ''}); "
                "re-harvest with --storage-dtype float32 (it holds the model's range), or pass --skip-nonfinite "
                "to drop them"
            )
        return finite

    for batch in store.scan(path, columns=["vector"], batch_size=batch_rows, version=version, limit=limit,
                            keep=keep, row_index=True):
        x = arrow_to_tensor(batch.column("vector"))
        yield x, torch.from_numpy(batch.column("_row").to_numpy(zero_copy_only=False).copy())


def nonfinite_rows(store: Store, path: Path, version: int | None = None) -> list[int]:
    """Dataset rows holding NaN or inf (a full scan, run only once one is seen)."""
    bad, row = [], 0
    for batch in store.scan(path, columns=["vector"], batch_size=65536, version=version):
        bad += (np.flatnonzero(~finite_rows(batch.column("vector"))) + row).tolist()
        row += batch.num_rows
    return bad


def rows_from(vectors: Iterator[tuple[torch.Tensor, torch.Tensor]], first_row: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (x_ND, rows_N) batches of ``vectors`` from dataset row ``first_row`` on (a disjoint
    calibration prefix; issue 22)."""
    for x, rows in vectors:
        if first_row <= 0 or bool((rows >= first_row).all()):
            yield x, rows
        elif bool((rows >= first_row).any()):
            keep = rows >= first_row
            yield x[keep], rows[keep]


class BuildInputs:
    """The build's input stream: (u_ND unit directions on ``device``, dataset rows_N).

    Drops rows equal to the center, skips the ``skip`` rows a previous build consumed, stops
    after ``budget`` rows (``truncated`` when rows were left), and counts the rows streamed
    (``seen``). Runs on
    the prefetch thread: reading, decoding, normalising and the host-to-device copy
    (pinned, non-blocking) overlap the screening.
    """

    def __init__(self, vectors: Iterator[tuple[torch.Tensor, torch.Tensor]], center_D: torch.Tensor,
                 skip: int, budget: int, device: torch.device):
        self.vectors, self.center, self.skip, self.budget, self.device = vectors, center_D, skip, budget, device
        self.seen, self.truncated = 0, False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        taken = 0
        for x, rows in self.vectors:
            if self.device.type == "cuda":
                x = x.pin_memory().to(self.device, non_blocking=True)
            u = unit_directions_(x.to(self.device), self.center)  # x is this thread's own copy
            keep = ~degenerate(u)  # a row equal to the center has no direction: no region (issue 8, item 7)
            if not keep.all():
                u, rows = u[keep], rows[keep.cpu()]
            skip = max(0, min(u.shape[0], self.skip - self.seen))  # rows a previous build consumed
            self.seen += u.shape[0]
            if skip == u.shape[0]:
                continue
            # Rows are left: only now is running out of budget a truncation (checking before the
            # skip made a rerun of a finished build say max_tokens and publish a new version).
            if taken >= self.budget:
                self.truncated = True
                return
            take = min(u.shape[0] - skip, self.budget - taken)
            if take > 0:
                taken += take
                yield u[skip : skip + take], rows[skip : skip + take]
