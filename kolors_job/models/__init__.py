"""Kolors itself: loading the parts from a local directory, the samplers, the real configs, the tiny models."""
