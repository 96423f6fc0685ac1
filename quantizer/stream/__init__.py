"""Read: a checkpoint on disk streamed one layer at a time into transformers' model (meta
skeleton), quantized originals read as float, calibration tokens and the hidden states
between layers."""
