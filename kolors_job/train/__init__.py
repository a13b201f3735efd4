"""The train stage: a Kolors LoRA trained as a recipe of named steps, checkpointed, validated, tracked."""
