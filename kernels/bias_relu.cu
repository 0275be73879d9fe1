// Fused bias + ReLU, forward and backward. float32, row-major.
//
// Computes: forward  y = max(x + b[c], 0) and mask = (x + b[c] > 0) for x (N, C, S) with S the
//           product of the remaining axes (S = H*W for images, 1 for (N, C) features);
//           y is written as v * mask, as NumPy's relu_forward does;
//           backward dx = dy * mask (the bias gradient, sum of dx over all axes but C, is a
//           reduction left to CuPy).
// Layout:   x, y, dy, dx (N, C, S) contiguous; b (C,); mask (N, C, S) bool (one byte).
// Launch:   block 256, 1-D grid with a grid-stride loop; one thread per 4 neighbours (float4
//           loads and stores) when the arrays are 16-byte aligned and 4 neighbours share a
//           channel (S % 4 == 0; backward: total % 4 == 0), one per element otherwise. int
//           indices: the wrapper keeps every array under 2**30 elements.
// Must match: minicnn/kernels.py::bias_relu_forward_reference / bias_relu_backward_reference
//           (ops.relu_forward / relu_backward applied to x + b, NumPy).
// Time:     python -m minicnn.bench kernels

__device__ __forceinline__ bool aligned16(const void* p) { return (unsigned long long)p % 16 == 0; }

// y = v * (v > 0) for v = x + b, and the mask, one element (NumPy's relu_forward, not fmaxf).
__device__ __forceinline__ float relu_masked(float v, bool* mask)
{
    const bool positive = v > 0.0f;
    *mask = positive;
    return v * (positive ? 1.0f : 0.0f);
}

extern "C" __global__ void bias_relu_forward(const float* __restrict__ x,
                                             const float* __restrict__ b,
                                             float* __restrict__ y, bool* __restrict__ mask,
                                             int total, int C, int S)
{
    const int first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
    if (S % 4 == 0 && aligned16(x) && aligned16(y)) {
        for (int i = first; i < total / 4; i += step) {          // elements 4i .. 4i+3
            const float4 v = reinterpret_cast<const float4*>(x)[i];
            const float bias = b[(4 * i / S) % C];
            float4 out;
            out.x = relu_masked(v.x + bias, mask + 4 * i);
            out.y = relu_masked(v.y + bias, mask + 4 * i + 1);
            out.z = relu_masked(v.z + bias, mask + 4 * i + 2);
            out.w = relu_masked(v.w + bias, mask + 4 * i + 3);
            reinterpret_cast<float4*>(y)[i] = out;
        }
    } else {
        for (int i = first; i < total; i += step) y[i] = relu_masked(x[i] + b[(i / S) % C], mask + i);
    }
}

extern "C" __global__ void bias_relu_backward(const float* __restrict__ dy,
                                              const bool* __restrict__ mask,
                                              float* __restrict__ dx, int total)
{
    const int first = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
    if (total % 4 == 0 && aligned16(dy) && aligned16(dx)) {
        for (int i = first; i < total / 4; i += step) {          // elements 4i .. 4i+3
            const float4 g = reinterpret_cast<const float4*>(dy)[i];
            const bool* m = mask + 4 * i;
            float4 out;
            out.x = g.x * (m[0] ? 1.0f : 0.0f);
            out.y = g.y * (m[1] ? 1.0f : 0.0f);
            out.z = g.z * (m[2] ? 1.0f : 0.0f);
            out.w = g.w * (m[3] ? 1.0f : 0.0f);
            reinterpret_cast<float4*>(dx)[i] = out;
        }
    } else {
        for (int i = first; i < total; i += step) dx[i] = dy[i] * (mask[i] ? 1.0f : 0.0f);
    }
}
