"""DuckDB over the store: views, canned questions (queries/*.sql). The only code that imports duckdb."""

# The views StoreDB registers (ep sql's help lists them); exemplar_vectors_d<width> holds FLOAT[width].
VIEWS = ("dictionaries", "exemplars", "exemplar_vectors", "exemplar_vectors_d<width>", "assignments",
         "foreign_assignments", "tokens", "saturation", "matches", "match_overlaps", "saes", "sae_activations",
         "ep_projections", "sae_features", "searches")
