"""Evaluations of EP dictionaries with the field's protocols (issue 10).

One module per protocol, each returning a small result dataclass the CLI writes as JSON:

- ``features``: run the dictionary's model over texts (harvest's code path) and pool per text;
- ``probe``: SAEBench sparse probing (``sparse_probe`` takes pooled feature matrices by name);
- ``concepts``: AxBench latent concept detection (best region vs difference of means);
- ``ood``: nearest-exemplar distance as an out-of-distribution score;
- ``tasks``: built-in offline tasks for all three;
- ``protocols``: which protocol made a run (``ours``, or ``paper``: the benchmarks as published;
  issue 22), ``saebench`` and ``axbench`` the paper protocols' own rules.
"""
