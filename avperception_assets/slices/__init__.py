"""Slices: one Geneva materialized view per failure mode and split, and their exports."""
