"""Compression of meta-learned networks (`metalearn compress`): pruning that survives adaptation, and what the
compressed network costs and weighs (docs/compression.md)."""
