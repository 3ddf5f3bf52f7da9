"""Reproducible performance measurements (ratios side by side)."""
