"""Models built from the package's attention modules."""
