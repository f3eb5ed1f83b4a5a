"""Thin-pool metadata: superblock, device details, two-level mapping tree."""
