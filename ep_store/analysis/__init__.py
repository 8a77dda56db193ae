"""Analyses of built dictionaries: matching, diffs, reports, search, verification of reproductions."""
