// Fused bias + ReLU, forward and backward. float32, row-major.
//
// Computes: forward  y = max(x + b[c], 0) and mask = (x + b[c] > 0) for x (N, C, S) with S the
//           product of the remaining axes (S = H*W for images, 1 for (N, C) features);
//           y is written as v * mask, as NumPy's relu_forward does;
//           backward dx = dy * mask (the bias gradient, sum of dx over all axes but C, is a
//           reduction left to CuPy).
// Layout:   x, y, dy, dx (N, C, S) contiguous; b (C,); mask (N, C, S) bool (one byte).
// Launch:   one thread per element, block 256, 1-D grid with a grid-stride loop.
// Must match: minicnn/kernels.py::bias_relu_forward_reference / bias_relu_backward_reference
//           (ops.relu_forward / relu_backward applied to x + b, NumPy).
// Time:     python -m minicnn.bench kernels

extern "C" __global__ void bias_relu_forward(const float* __restrict__ x,
                                             const float* __restrict__ b,
                                             float* __restrict__ y, bool* __restrict__ mask,
                                             long long total, int C, int S)
{
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const float v = x[i] + b[(i / S) % C];
        const bool positive = v > 0.0f;
        y[i] = v * (positive ? 1.0f : 0.0f);
        mask[i] = positive;
    }
}

extern "C" __global__ void bias_relu_backward(const float* __restrict__ dy,
                                              const bool* __restrict__ mask,
                                              float* __restrict__ dx, long long total)
{
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step)
        dx[i] = dy[i] * (mask[i] ? 1.0f : 0.0f);
}
