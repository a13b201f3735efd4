"""Drawing with Kolors and a LoRA, reproducibly: the pipeline the story, the validation frames and
``kolors-job sample`` share."""
