// 2-D convolution (cross-correlation, as PyTorch) as three implicit GEMMs. float32 in, float32
// accumulation; the im2col matrix is never materialised: each tile of it is gathered from the
// images straight into shared memory.
//
// Computes: with K = C*KH*KW, k = (c*KH + kh)*KW + kw, P = OH*OW, p = oh*OW + ow and
//           patch(n, k, p) = x[n, c, oh*SH - PT + kh, ow*SW - PL + kw] (zero in the padding),
//   conv2d_forward          out[n, f, p] = sum_k w[f, k] * patch(n, k, p) + b[f]
//                           GEMM (F x K) @ (K x N*P): rows f, columns (n, p).
//   conv2d_backward_data    dx[n, c, h, w] = sum_{f, kh, kw} w[f, c, kh, kw] * dout[n, f, oh, ow]
//                           over the (oh, ow) whose window puts tap (kh, kw) on (h, w): the
//                           transposed implicit GEMM (C x F*KH*KW) @ (F*KH*KW x N*H*W), a gather
//                           (no atomics); with stride > 1 most taps of a pixel are empty.
//   conv2d_backward_weight  dw_part[z, f, k] = sum_{(n, p) in split z} dout[n, f, p] * patch(n, k, p)
//                           GEMM (F x N*P) @ (N*P x K), the N*P reduction split over gridDim.z
//                           ("split-K") into partial sums that the caller adds up (no atomics).
// Layout:   x (N, C, H, W), w (F, C, KH, KW), b (F,), out/dout (N, F, OH, OW), dx like x,
//           dw_part (SPLITS, F, K); all contiguous, row-major; padding (PT, PB), (PL, PR): only
//           PT and PL are needed, OH and OW carry the rest.
// Launch:   block 256 threads = 16 x 16; each block computes a BM x BN = 64 x 64 output tile,
//           staging BK = 16-deep slices of both operands in shared memory; each thread owns a
//           4 x 4 register micro-tile: rows ty + 16*i, columns tx + 16*j (strided, so the
//           shared-memory reads are conflict-free and the stores coalesce).
//           grid: forward (ceil(N*P/64), ceil(F/64)); backward_data (ceil(N*H*W/64), ceil(C/64));
//           backward_weight (ceil(K/64), ceil(F/64), SPLITS).
// Must match: minicnn/ops/conv.py::conv2d_forward and ::conv2d_backward (NumPy, im2col + GEMM).
// Time:     python -m minicnn.bench kernels

constexpr int BM = 64;          // output rows per block (filters f, or channels c)
constexpr int BN = 64;          // output columns per block (pixels, or weight taps k)
constexpr int BK = 16;          // reduction depth staged in shared memory per step
constexpr int THREADS = 256;    // 16 x 16 threads, 4 x 4 results each
constexpr int LOADS = 4;        // elements of each operand tile one thread loads: BM*BK / THREADS

struct Tiles {
    float a[BK][BM + 2];        // A tile, reduction-major; +2 makes the loading stores conflict-free
    float b[BK][BN];            // B tile, reduction-major
};

// acc[i][j] += sum_kk a[kk][ty + 16 i] * b[kk][tx + 16 j]
__device__ __forceinline__ void multiply_tiles(const Tiles& s, float acc[4][4], int tx, int ty)
{
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = s.a[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = s.b[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
}

// Write a block's results: acc[i][j] is output row row0 + ty + 16*i (a filter f or a channel c)
// of output column col0 + tx + 16*j, a column being (n, p) = (col / pixels, col % pixels) of an
// (images, rows, pixels) array; plus bias[row] when bias is not null. The forward's out
// (N, F, OH*OW), backward_data's dx (N, C, H*W) and backward_weight's (F, K) slice (one "image"
// of F rows of K) all have this shape.
__device__ __forceinline__ void store_tile(const float acc[4][4], float* __restrict__ out,
                                           const float* __restrict__ bias, int rows, int pixels,
                                           int columns, int row0, int col0, int tx, int ty)
{
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int col = col0 + tx + 16 * j;
        if (col >= columns) continue;
        const int n = col / pixels, p = col - n * pixels;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int r = row0 + ty + 16 * i;
            if (r < rows) out[((long long)n * rows + r) * pixels + p] = bias ? acc[i][j] + bias[r] : acc[i][j];
        }
    }
}

// Loading pattern, the same in all three kernels (THREADS = 256 is a multiple of BK and BN):
//   A tile element (kk, mm): kk = tid % BK, mm = tid / BK + 16 q  -> one reduction index per thread
//   B tile element (kk, nn): nn = tid % BN, kk = tid / BN + 4 q   -> one output column per thread
// so each thread decodes its fixed index once and only the other one per load.

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_forward(const float* __restrict__ x, const float* __restrict__ w,
               const float* __restrict__ bias, float* __restrict__ out,
               int N, int C, int H, int W, int F, int KH, int KW,
               int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int K = C * KH * KW, P = OH * OW, NP = N * P;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    // This thread's B column: output pixel (n, oh, ow), fixed for the whole reduction.
    const int b_col = col0 + tid % BN;
    const bool b_col_valid = b_col < NP;
    const int b_n = b_col_valid ? b_col / P : 0;
    const int b_p = b_col - b_n * P;
    const int b_h0 = (b_p / OW) * SH - PT, b_w0 = (b_p % OW) * SW - PL;
    const float* b_image = x + (long long)b_n * C * H * W;

    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        const int a_k = k0 + tid % BK;                      // A: w[f, k], f = row0 + tid/16 + 16q
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {
            const int mm = tid / BK + 16 * q, f = row0 + mm;
            s.a[tid % BK][mm] = (f < F && a_k < K) ? w[(long long)f * K + a_k] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {                   // B: patch(n, k, p)
            const int kk = tid / BN + 4 * q, k = k0 + kk;
            float v = 0.0f;
            if (b_col_valid && k < K) {
                const int c = k / (KH * KW), r = k - c * (KH * KW);
                const int h = b_h0 + r / KW, wi = b_w0 + r % KW;
                if (h >= 0 && h < H && wi >= 0 && wi < W) v = b_image[((long long)c * H + h) * W + wi];
            }
            s.b[kk][tid % BN] = v;
        }
        __syncthreads();
        multiply_tiles(s, acc, tx, ty);
        __syncthreads();
    }

    store_tile(acc, out, bias, F, P, NP, row0, col0, tx, ty);
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_data(const float* __restrict__ dout, const float* __restrict__ w,
                     float* __restrict__ dx,
                     int N, int C, int H, int W, int F, int KH, int KW,
                     int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int KK = KH * KW, R = F * KK, HW = H * W, NHW = N * HW;   // R: reduction over (f, kh, kw)
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    // This thread's B column: input pixel (n, h, w), fixed for the whole reduction.
    const int b_col = col0 + tid % BN;
    const bool b_col_valid = b_col < NHW;
    const int b_n = b_col_valid ? b_col / HW : 0;
    const int b_hw = b_col - b_n * HW;
    const int b_h = b_hw / W + PT, b_w = b_hw % W + PL;             // padded coordinates
    const float* b_dout = dout + (long long)b_n * F * OH * OW;

    float acc[4][4] = {};
    for (int r0 = 0; r0 < R; r0 += BK) {
        const int a_r = r0 + tid % BK;                      // A: w[f, c, kh, kw], r = f*KK + tap
        const int a_f = a_r / KK, a_tap = a_r - a_f * KK;
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {
            const int mm = tid / BK + 16 * q, c = row0 + mm;
            s.a[tid % BK][mm] = (c < C && a_r < R) ? w[((long long)a_f * C + c) * KK + a_tap] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {                   // B: dout[n, f, oh, ow] or 0
            const int kk = tid / BN + 4 * q, r = r0 + kk;
            float v = 0.0f;
            if (b_col_valid && r < R) {
                const int f = r / KK, tap = r - f * KK;
                const int oh_s = b_h - tap / KW, ow_s = b_w - tap % KW;   // oh*SH, ow*SW if a window
                if (oh_s >= 0 && ow_s >= 0 && oh_s % SH == 0 && ow_s % SW == 0) {
                    const int oh = oh_s / SH, ow = ow_s / SW;
                    if (oh < OH && ow < OW) v = b_dout[((long long)f * OH + oh) * OW + ow];
                }
            }
            s.b[kk][tid % BN] = v;
        }
        __syncthreads();
        multiply_tiles(s, acc, tx, ty);
        __syncthreads();
    }

    store_tile(acc, dx, nullptr, C, HW, NHW, row0, col0, tx, ty);
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_weight(const float* __restrict__ x, const float* __restrict__ dout,
                       float* __restrict__ dw_part, int split_size,
                       int N, int C, int H, int W, int F, int KH, int KW,
                       int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int KK = KH * KW, K = C * KK, P = OH * OW, NP = N * P;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const int j_begin = blockIdx.z * split_size;                       // this block's (n, p) range
    const int j_end = j_begin + split_size < NP ? j_begin + split_size : NP;

    // This thread's B column: weight tap k = (c, kh, kw), fixed for the whole reduction.
    const int b_k = col0 + tid % BN;
    const bool b_k_valid = b_k < K;
    const int b_c = b_k / KK, b_tap = b_k - b_c * KK;
    const int b_kh = b_tap / KW - PT, b_kw = b_tap % KW - PL;
    const float* b_plane = x + (long long)b_c * H * W;

    float acc[4][4] = {};
    for (int j0 = j_begin; j0 < j_end; j0 += BK) {
        const int a_j = j0 + tid % BK;                      // A: dout[n, f, p], j = n*P + p
        const int a_n = a_j / P, a_p = a_j - a_n * P;
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {
            const int mm = tid / BK + 16 * q, f = row0 + mm;
            s.a[tid % BK][mm] = (f < F && a_j < j_end) ? dout[((long long)a_n * F + f) * P + a_p] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < LOADS; ++q) {                   // B: patch(n, k, p)
            const int kk = tid / BN + 4 * q, j = j0 + kk;
            float v = 0.0f;
            if (b_k_valid && j < j_end) {
                const int n = j / P, p = j - n * P;
                const int h = (p / OW) * SH + b_kh, wi = (p % OW) * SW + b_kw;
                if (h >= 0 && h < H && wi >= 0 && wi < W)
                    v = b_plane[((long long)n * C * H + h) * W + wi];
            }
            s.b[kk][tid % BN] = v;
        }
        __syncthreads();
        multiply_tiles(s, acc, tx, ty);
        __syncthreads();
    }

    store_tile(acc, dw_part + (long long)blockIdx.z * F * K, nullptr, F, K, K, row0, col0, tx, ty);
}
