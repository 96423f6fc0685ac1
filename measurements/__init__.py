"""measurement.json, job state, fingerprints, bits-per-weight optimiser (installed as quantizer.measurements)."""
