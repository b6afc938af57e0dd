"""Experiment configs shipped with the package (YAML)."""
