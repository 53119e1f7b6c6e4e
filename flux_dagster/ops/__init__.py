"""Dagster ops: thin wrappers over the plain functions of ``flux_dagster.nodes`` and friends."""
