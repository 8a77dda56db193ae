"""ep_store: a versioned store, builder and SQL layer for Exemplar Partitioning dictionaries.

Shape convention (used throughout): suffixes name tensor axes, e.g. ``x_ND`` (N tokens by
D model width), ``E_KD`` (K exemplars), ``sim_NK`` (token-by-exemplar cosine).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ep_store")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"
