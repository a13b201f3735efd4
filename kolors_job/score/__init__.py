"""The score stage: the aesthetic predictor as the challenge computes it, and the story's coherence."""
