"""Triton W4A16 kernels, the packing layouts, and QuantLinear (installed as quantizer.kernels)."""
