"""What a stage ran with: library versions, CPU capability, device and dtype (issue 18, item E14.1).

A faithful reproduction on another machine (other CPU kernels, other library releases) can
move activations in their last bits and region counts by about 1%; every stage therefore
records ``environment()`` beside its outputs (harvest dataset metadata, build meta.json,
assignment metadata, match meta.json, fine-tuning and evaluation metrics, SAE meta.json), so
``ep store verify`` and a reader can tell a different machine from a different computation.

Digests (ep_store.store.digest) ignore the ``environment`` key: they stay machine-independent
wherever the data are.
"""

from __future__ import annotations

import functools
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

ENVIRONMENT_KEY = "environment"
"""The key under which every stage's meta records ``environment()``; digests skip it."""

PACKAGES = {"torch": "torch", "transformers": "transformers", "numpy": "numpy", "pyarrow": "pyarrow",
            "pylance": "pylance", "duckdb": "duckdb", "scipy": "scipy", "ep_store": "ep_store"}
"""Recorded name -> distribution name (read from installed metadata: nothing is imported,
so duckdb stays inside ep_store.sql.db)."""


@functools.cache  # installed versions do not change within a process; stages call this per commit
def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def cpu_capability() -> str | None:
    """torch's CPU kernel capability (e.g. "AVX2", "AVX512"), None where torch cannot say."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # very old torch
        return None


def cpu_native_bf16() -> bool | None:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX tiles), which
    ``get_cpu_capability`` does not say; None where torch has no probe. Decides ``ep build
    --precision auto`` (ep_store.kernels.screen.native_bf16 asks the same probes)."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes) if all(probes) else None


def environment(device=None, dtype=None) -> dict:
    """``{"python", "torch", "transformers", "numpy", "pyarrow", "pylance", "duckdb", "scipy",
    "ep_store", "cpu_capability", "cpu_native_bf16", "machine", "system", "device"?, "dtype"?, "cuda"?, "gpu"?}``:
    versions are strings (None when a package is not installed); ``device`` (a torch.device or
    str) and ``dtype`` (a torch.dtype or str) are recorded when given, and on a CUDA device the
    CUDA release and card name. No side effects.
    """
    env = {"python": platform.python_version(), **{k: _version(d) for k, d in PACKAGES.items()}}
    if "lance" in sys.modules:  # the imported module is the truth where a source build differs
        env["pylance"] = getattr(sys.modules["lance"], "__version__", env["pylance"])
    env |= {"cpu_capability": cpu_capability(), "cpu_native_bf16": cpu_native_bf16(), "machine": platform.machine(),
            "system": platform.system()}
    if device is not None:
        env["device"] = str(device)
        if str(device).startswith("cuda"):  # GPU kernels differ by card and CUDA release
            import torch

            env |= {"cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(torch.device(device))}
    if dtype is not None:
        env["dtype"] = str(dtype).removeprefix("torch.")
    return env
