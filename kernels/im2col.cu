// im2col and col2im: the index maths of convolution as a matrix product. float32, row-major.
//
// Computes: im2col  x (N, C, H, W) -> cols (N, C*KH*KW, OH*OW), a copy of every window;
//           col2im  cols (N, C*KH*KW, OH*OW) -> dx (N, C, H, W), its adjoint: each pixel gets the
//           sum of the column entries copied from it.
// Layout:   cols row (c*KH + kh)*KW + kw, column oh*OW + ow; input pixel (oh*SH - PT + kh,
//           ow*SW - PL + kw); pixels in the padding read as zero (im2col) or are dropped (col2im).
// Launch:   one thread per output element, block 256, 1-D grid with a grid-stride loop; int
//           indices (the wrapper keeps every array under 2**30 elements): 32-bit division, not 64.
//           col2im is a gather (each thread sums its own pixel's taps): no atomics, and the sum
//           runs in NumPy's order (kh, then kw, ascending), so the result is bit-identical.
// Must match: minicnn/ops/im2col.py::im2col and ::col2im (NumPy).
// Time:     python -m minicnn.bench kernels

extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ cols,
                                  int N, int C, int H, int W, int KH, int KW,
                                  int SH, int SW, int PT, int PL, int OH, int OW)
{
    const int total = N * C * KH * KW * OH * OW;
    const int step = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        // i runs over (n, c, kh, kw, oh, ow), row-major: exactly the layout of cols.
        int t = i;
        const int ow = t % OW; t /= OW;
        const int oh = t % OH; t /= OH;
        const int kw = t % KW; t /= KW;
        const int kh = t % KH;
        const int plane = t / KH;                       // n * C + c
        const int h = oh * SH - PT + kh;
        const int w = ow * SW - PL + kw;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        cols[i] = inside ? x[(plane * H + h) * W + w] : 0.0f;
    }
}

extern "C" __global__ void col2im(const float* __restrict__ cols, float* __restrict__ dx,
                                  int N, int C, int H, int W, int KH, int KW,
                                  int SH, int SW, int PT, int PL, int OH, int OW)
{
    const int total = N * C * H * W;
    const int step = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int w = i % W, h = (i / W) % H;
        const int plane = i / (H * W);                  // n * C + c
        const float* image_cols = cols + plane * KH * KW * OH * OW;
        float sum = 0.0f;
        for (int kh = 0; kh < KH; ++kh) {
            const int oh_stride = h + PT - kh;          // = oh * SH when tap kh of window oh is here
            if (oh_stride < 0 || oh_stride % SH != 0 || oh_stride / SH >= OH) continue;
            const int oh = oh_stride / SH;
            for (int kw = 0; kw < KW; ++kw) {
                const int ow_stride = w + PL - kw;
                if (ow_stride < 0 || ow_stride % SW != 0 || ow_stride / SW >= OW) continue;
                const int ow = ow_stride / SW;
                sum += image_cols[(kh * KW + kw) * OH * OW + oh * OW + ow];
            }
        }
        dx[i] = sum;
    }
}
