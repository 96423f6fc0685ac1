"""Validate: perplexity / KL of an export against its original, layer by layer, and loading
an export for inference."""
