"""DuckDB over the store: views, canned questions (queries/*.sql). The only code that imports duckdb."""
