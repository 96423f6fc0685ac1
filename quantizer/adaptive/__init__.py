"""Adaptive GPTQ (fractional --bits): measure every candidate setting per module group,
allocate bits to meet the target, then quantize with them."""
