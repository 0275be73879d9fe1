"""The benchmarks: python -m minicnn.bench (models.py: the CPU tables against PyTorch, with GPU
columns from gpu.py) and python -m minicnn.bench kernels (kernels.py: the CUDA kernel ladder)."""
