"""The job manifest: a typed, validated description of one LoRA-story job, its two recipes, loading it."""
