# Sourced by the GPU-box scripts (gpu_run.sh, gpu_quality.sh) from the repository root.
# The box has no network: `kernels`, `calibration`, `measurements` are importable only as
# quantizer.* (pyproject maps them there); links give the same layout without installing.
export PYTHONUNBUFFERED=1
for pkg in kernels calibration measurements; do
  [ -e "quantizer/$pkg" ] || ln -sfn "../$pkg" "quantizer/$pkg"
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
