"""kolors-job: a job manifest in; a trained Kolors LoRA, an 8-frame story, scores and a report out."""

__version__ = "0.1.0"
