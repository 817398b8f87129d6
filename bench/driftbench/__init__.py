"""The drift benchmark's parts (bench/drift.py runs them)."""
