"""Device-to-host copies of activation blocks in the storage dtype (issue 12). Pure torch.

The naive path, ``x.float().cpu().numpy().astype(float16)``, converts on the host and
synchronises; on an H200 it took 60 ms for a 4,096 x 2,304 bf16 block against 0.39 ms for
converting on the device and copying into a pinned buffer with ``non_blocking=True``.

    copier = HostCopy()
    host = copier.copy(x_ND, torch.float16)   # returns at once on a GPU
    ...                                       # next forward pass
    copier.wait(); arr = host.numpy()         # before reading the buffer
"""

from __future__ import annotations

import torch


class HostCopy:
    """Pinned host buffers reused across copies, one per in-flight slot.

    ``copy(x, dtype)`` converts ``x`` to ``dtype`` on its device and starts an asynchronous
    copy into a pinned buffer (``slots`` buffers rotate, so a buffer is not overwritten
    while the caller may still read it); ``wait()`` blocks until the copies issued so far
    have landed. On CPU tensors it is a plain conversion.
    """

    def __init__(self, slots: int = 2):
        self.slots = slots
        self._buffers: list[torch.Tensor | None] = [None] * slots
        self._next = 0
        self._event = None

    def copy(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.device.type == "cpu":
            return x.to(dtype)
        converted = x.to(dtype)  # on the device: half the bytes cross the bus
        slot = self._next
        self._next = (slot + 1) % self.slots
        buf = self._buffers[slot]
        if buf is None or buf.numel() < converted.numel() or buf.dtype != dtype:
            buf = torch.empty(converted.numel(), dtype=dtype, pin_memory=True)
            self._buffers[slot] = buf
        out = buf[: converted.numel()].view(converted.shape)
        out.copy_(converted, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()
        return out

    def wait(self) -> None:
        """Block until every copy issued so far is in host memory."""
        if self._event is not None:
            self._event.synchronize()
