"""Exporters: AutoAWQ GEMM, GPTQ, compressed-tensors; the sharded writer."""
