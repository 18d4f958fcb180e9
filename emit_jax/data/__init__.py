"""Data: image preprocessing (more arrives with the IAD data pipeline)."""
