"""Meta-training tasks built from unlabeled images: UMTRA (augmented copies) and CACTUs (clusters of an
embedding), and what they need (augmentations, embeddings, k-means partitions)."""
