"""The CUDA bridge: kernels.py compiles the hand-written kernels of the top-level kernels/*.cu
(shipped inside a wheel as minicnn/cuda_src/) with NVRTC and launches them on CuPy arrays."""
