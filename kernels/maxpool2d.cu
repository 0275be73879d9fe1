// Max pooling over KH x KW windows with stride (SH, SW), no padding. float32, row-major.
//
// Computes: forward  x (N, C, H, W) -> out (N, C, OH, OW), the max of each window, and argmax
//           (N, C, OH, OW) uint8: the winning tap kh*KW + kw (first maximum wins: strict >, as
//           NumPy's loop and PyTorch do; a NaN beats every number, so a window holding one
//           gives NaN, as np.maximum does, and its last NaN's tap, as PyTorch's kernels do);
//           backward dout (N, C, OH, OW), argmax -> dx (N, C, H, W): each window's gradient goes
//           to its winning tap; pixels in several windows (stride < kernel) get the sum.
// Layout:   NCHW; OH = (H - KH) / SH + 1, OW = (W - KW) / SW + 1; KH*KW <= 256 (uint8 taps).
// Launch:   forward: one thread per output pixel; backward: one thread per input pixel (a
//           gather over the windows that contain it, no atomics, summed in NumPy's tap order so
//           dx is bit-identical). Block 256, 1-D grid with a grid-stride loop; int indices (the
//           wrapper keeps every array under 2**30 elements): 32-bit division, not 64.
// Must match: minicnn/ops/pool.py::maxpool2d_forward and ::maxpool2d_backward (NumPy).
// Time:     python -m minicnn.bench kernels

// Element i of an (planes, rows, cols) array -> its plane (n*C + c); *row, *col its position.
__device__ __forceinline__ int unravel(int i, int rows, int cols, int* row, int* col)
{
    const int t = i / cols;
    *col = i - t * cols;
    *row = t % rows;
    return t / rows;
}

extern "C" __global__ void maxpool2d_forward(const float* __restrict__ x, float* __restrict__ out,
                                             unsigned char* __restrict__ argmax,
                                             int N, int C, int H, int W, int KH, int KW,
                                             int SH, int SW, int OH, int OW)
{
    const int total = N * C * OH * OW;
    const int step = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        int oh, ow;
        const int plane = unravel(i, OH, OW, &oh, &ow);           // n * C + c
        const float* window = x + (plane * H + oh * SH) * W + ow * SW;
        float best = window[0];
        int best_tap = 0;
        for (int kh = 0; kh < KH; ++kh) {
            for (int kw = 0; kw < KW; ++kw) {
                const float v = window[kh * W + kw];
                // strict: earlier taps keep ties; v != v: v is NaN, and wins (as in PyTorch)
                if (v > best || v != v) {
                    best = v;
                    best_tap = kh * KW + kw;
                }
            }
        }
        out[i] = best;
        argmax[i] = (unsigned char)best_tap;
    }
}

extern "C" __global__ void maxpool2d_backward(const float* __restrict__ dout,
                                              const unsigned char* __restrict__ argmax,
                                              float* __restrict__ dx,
                                              int N, int C, int H, int W, int KH, int KW,
                                              int SH, int SW, int OH, int OW)
{
    const int total = N * C * H * W;
    const int step = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        int h, w;
        const int plane = unravel(i, H, W, &h, &w);               // n * C + c
        // Windows oh whose rows oh*SH .. oh*SH + KH - 1 contain h, likewise ow for w.
        const int oh_first = h - KH + 1 <= 0 ? 0 : (h - KH + SH) / SH;
        const int ow_first = w - KW + 1 <= 0 ? 0 : (w - KW + SW) / SW;
        const int oh_last = h / SH < OH - 1 ? h / SH : OH - 1;
        const int ow_last = w / SW < OW - 1 ? w / SW : OW - 1;
        float sum = 0.0f;
        // NumPy adds tap by tap, k = kh*KW + kw ascending; kh = h - oh*SH grows as oh falls.
        for (int oh = oh_last; oh >= oh_first; --oh) {
            for (int ow = ow_last; ow >= ow_first; --ow) {
                const int o = (plane * OH + oh) * OW + ow;
                if (argmax[o] == (h - oh * SH) * KW + (w - ow * SW)) sum += dout[o];
            }
        }
        dx[i] = sum;
    }
}
