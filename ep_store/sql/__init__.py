"""DuckDB over the store: views, canned questions (queries/*.sql). The only code that imports duckdb.

- ``db``: ``StoreDB`` (a read-only connection with the store's views) and the question runners
  ``ask``, ``ask_pair``, ``ask_any``, ``question_table``, ``check_options``;
- ``views``: which views a connection holds and how each is read from the store;
- ``questions``: the registry of canned questions, one ``queries/<name>.sql`` file each.

Other layers import ``StoreDB``, ``ask`` and ``ask_pair`` from ``ep_store.sql.db``: this package
re-exports none of them, so that ``ep --help`` (which reads the question registry and ``VIEWS``)
imports no duckdb.
"""

# The views StoreDB registers (ep sql's help lists them); exemplar_vectors_d<width> holds FLOAT[width].
VIEWS = ("dictionaries", "exemplars", "exemplar_vectors", "exemplar_vectors_d<width>", "assignments",
         "foreign_assignments", "tokens", "saturation", "matches", "match_overlaps", "saes", "sae_activations",
         "ep_projections", "sae_features", "searches")
