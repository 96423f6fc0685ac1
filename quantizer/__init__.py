"""layerquant: a memory-budgeted, layer-by-layer quantizer for LLMs."""
__version__ = "0.1.0"
