"""The story stage: draw the frames with Kolors and the trained LoRA, reproducibly, in batches."""
