"""Node types: plain functions that run one node, testable without Dagster."""
