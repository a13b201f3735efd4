"""The dataset stage: scan a local dataset directory, its captions, aspect-ratio buckets, training images."""
