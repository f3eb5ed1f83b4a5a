"""Offline metadata tools: check, dump, restore, ls, delta."""
