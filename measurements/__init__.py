"""measurement.json, job state, fingerprints, bits-per-weight optimiser (installed as quantizer.measurements)."""
from .atomic import (WriteFailed, atomic_save_tensors, atomic_write_bytes, atomic_write_json,
                     inject_write_failure, load_tensors, read_json)
from .fingerprint import (fingerprint_calibration, fingerprint_differences, fingerprint_model,
                          job_fingerprint)
from .jobstate import STAGES, JobDir
from .optimizer import Candidate, Choice, Group, choose
from .store import MeasurementStore

__all__ = [
    "WriteFailed", "atomic_save_tensors", "atomic_write_bytes", "atomic_write_json",
    "inject_write_failure", "load_tensors", "read_json", "fingerprint_calibration",
    "fingerprint_differences", "fingerprint_model", "job_fingerprint", "STAGES", "JobDir",
    "Candidate", "Choice", "Group", "choose", "MeasurementStore",
]
