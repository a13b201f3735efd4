"""``kolors-job sample``: any prompts with a LoRA at several scales, the base model beside them."""
