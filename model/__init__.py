"""The shared transformer (`Model`) and its pieces."""
