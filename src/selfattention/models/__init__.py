"""Whole models built from the package's attention modules."""
