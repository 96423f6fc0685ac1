"""Quantize: the methods. Each turns (decoder layer, calibration inputs, settings) into a
QuantizedWeight per linear; methods never load files or choose devices.

A method is an object with `name`, `needs_calibration` and `quantize_layer(ctx)` where ctx is
a methods.context.LayerContext. It may change the layer's float weights (AWQ folds scales
into norms); it returns {linear name: QuantizedWeight}. The run then swaps each linear's
weight for its dequantized value and runs the layer to produce the next layer's inputs.
`get_method` (methods/registry.py) builds one from its name and typed options; each method's
memory terms for the planner are methods/<method>_memory.py."""
