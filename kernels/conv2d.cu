// 2-D convolution (cross-correlation, as PyTorch) as implicit GEMMs. float32 in, float32
// accumulation; the im2col matrix is never materialised: each tile of it is gathered from the
// images straight into shared memory.
//
// Computes: with K = C*KH*KW, k = (c*KH + kh)*KW + kw, P = OH*OW, p = oh*OW + ow and
//           patch(n, k, p) = x[n, c, oh*SH - PT + kh, ow*SW - PL + kw] (zero in the padding),
//   conv2d_forward          out[n, f, p] = sum_k w[f, k] * patch(n, k, p) + b[f]
//                           GEMM (F x K) @ (K x N*P): rows f, columns (n, p). taps (K', 4) int:
//                           row k = (c*H*W + kh*W + kw, kh, kw, 0), K' = K rounded up to BK with
//                           rows no pixel is inside (kh = -2**30); the wrapper builds it once per
//                           shape. With dout as x, w flipped in (kh, kw) and transposed to (C, F,
//                           KH, KW) and padding (KH-1-PT, KW-1-PL), it is also the stride-1
//                           backward_data (minicnn/cuda/kernels.py::conv2d_backward_data).
//   conv2d_backward_data    dx[n, c, h, w] = sum_{kh, kw} sum_f w[f, c, kh, kw] * dout[n, f, oh, ow]
//                           with (oh, ow) the window whose tap (kh, kw) lands on (h, w), if any:
//                           GEMM (C x F) @ (F x N*H*W) per tap, a gather (no atomics); for stride > 1.
//   conv2d_backward_weight  dw_part[z, f, k] = sum_{(n, p) in split z} dout[n, f, p] * patch(n, k, p)
//                           GEMM (F x N*P) @ (N*P x K), the N*P reduction split over gridDim.z
//                           ("split-K") into partial sums that the caller adds up (no atomics).
// Layout:   x (N, C, H, W), w (F, C, KH, KW), b (F,), out/dout (N, F, OH, OW), dx like x,
//           dw_part (SPLITS, F, K); all contiguous, row-major; padding (PT, PB), (PL, PR): only
//           PT and PL are needed, OH and OW carry the rest. Fewer than 2**30 elements each (int
//           offsets).
// Launch:   block 128 threads = 8 x 16; each block computes a BM x BN = 64 x 128 output tile,
//           staging BK = 16-deep slices of both operands in shared memory; thread (ty, tx) owns an
//           8 x 8 register micro-tile: rows 4ty..4ty+3 and 32+4ty.., columns 4tx..4tx+3 and
//           64+4tx.., so it reads its operands as four float4s per reduction step.
//           grid: forward (ceil(N*P/128), ceil(F/64)); backward_data (ceil(N*H*W/128), ceil(C/64));
//           backward_weight (ceil(K/128), ceil(F/64), SPLITS).
// No integer division in the reduction loops: the forward looks its rows' taps up in the taps
//           table; backward_data runs the taps (kh, kw) in outer loops, walking the window's
//           (oh, ow) by increments, and the filters in the inner one (a fixed pointer plus a
//           stride); backward_weight walks its (n, oh, ow) by increments and keeps each column's
//           tap in a shared-memory table built once per block. The machine code (instructions per
//           FFMA in each inner loop, registers, spills): python -m minicnn.bench sass
// Must match: minicnn/ops/conv.py::conv2d_forward and ::conv2d_backward (NumPy, im2col + GEMM).
// Time:     python -m minicnn.bench kernels

constexpr int BM = 64;          // output rows per block (filters f, or channels c)
constexpr int BN = 128;         // output columns per block (pixels, or weight taps k)
constexpr int BK = 16;          // reduction depth staged in shared memory per step
constexpr int THREADS = 128;    // 8 x 16 threads, 8 x 8 results each
constexpr int A_LOADS = BM * BK / THREADS;      // A tile elements each thread loads per step: 8
constexpr int B_LOADS = BN * BK / THREADS;      // B tile elements each thread loads per step: 16

struct alignas(16) Tiles {
    float a[BK][BM + 4];        // A tile, reduction-major; +4: at most 2-way bank conflicts in
    float b[BK][BN + 4];        // the loading stores, and rows stay 16-byte aligned for float4s
};

// Micro-tile row i (0..7) of thread row ty, and column j (0..7) of thread column tx.
__device__ __forceinline__ int tile_row(int i, int ty) { return (i / 4) * 32 + 4 * ty + i % 4; }
__device__ __forceinline__ int tile_col(int j, int tx) { return (j / 4) * 64 + 4 * tx + j % 4; }

__device__ __forceinline__ void load4(float* to, const float* from)     // from: 16-byte aligned
{
    const float4 v = *reinterpret_cast<const float4*>(from);
    to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}

// acc[i][j] += sum_kk a[kk][tile_row(i)] * b[kk][tile_col(j)]: 64 FFMA per 4 shared loads.
__device__ __forceinline__ void multiply_tiles(const Tiles& s, float acc[8][8], int tx, int ty)
{
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        float a[8], b[8];
        load4(a, &s.a[kk][4 * ty]);
        load4(a + 4, &s.a[kk][32 + 4 * ty]);
        load4(b, &s.b[kk][4 * tx]);
        load4(b + 4, &s.b[kk][64 + 4 * tx]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
    }
}

// Write a block's results: acc[i][j] is output row row0 + tile_row(i) (a filter f or a channel c)
// of output column col0 + tile_col(j), a column being (n, p) = (col / pixels, col % pixels) of an
// (images, rows, pixels) array; plus bias[row] when bias is not null. The forward's out
// (N, F, OH*OW), backward_data's dx (N, C, H*W) and backward_weight's (F, K) slice (one "image"
// of F rows of K) all have this shape.
__device__ __forceinline__ void store_tile(const float acc[8][8], float* __restrict__ out,
                                           const float* __restrict__ bias, int rows, int pixels,
                                           int columns, int row0, int col0, int tx, int ty)
{
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int col = col0 + tile_col(j, tx);
        if (col >= columns) continue;
        const int n = col / pixels, p = col - n * pixels;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int r = row0 + tile_row(i, ty);
            if (r < rows) out[(n * rows + r) * pixels + p] = bias ? acc[i][j] + bias[r] : acc[i][j];
        }
    }
}

// acc += backward_data's GEMM of one tap (kh, kw), the reduction index r running over depth
// (the filters f) in steps of BK:
//   A[m, r] = w_tap[m * a_row_stride + r * a_red_stride]   for rows m = row0 + mm < rows, else 0
//   B[r, col] = src_tap[r * plane] if hit, else 0           col: this thread's column, col0 + tid
// Loading: A element (kk, mm) by thread tid with kk = tid % BK, mm = tid / BK + 8q; each thread
// loads the whole B column tid, so a warp reads 32 neighbouring pixels of one plane.
__device__ __forceinline__ void accumulate_tap(Tiles& s, float acc[8][8], int tid,
                                               const float* __restrict__ w_tap, int rows, int row0,
                                               int a_row_stride, int a_red_stride,
                                               const float* __restrict__ src_tap, bool hit,
                                               int plane, int depth)
{
    const int kk_a = tid % BK;
    for (int r0 = 0; r0 < depth; r0 += BK) {
        const int r_a = r0 + kk_a;
#pragma unroll
        for (int q = 0; q < A_LOADS; ++q) {
            const int mm = tid / BK + (THREADS / BK) * q, m = row0 + mm;
            s.a[kk_a][mm] = (m < rows && r_a < depth) ? w_tap[m * a_row_stride + r_a * a_red_stride] : 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const int r = r0 + kk;
            s.b[kk][tid] = (hit && r < depth) ? src_tap[r * plane] : 0.0f;
        }
        __syncthreads();
        multiply_tiles(s, acc, tid % 16, tid / 16);
        __syncthreads();
    }
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_forward(const float* __restrict__ x, const float* __restrict__ w,
               const float* __restrict__ bias, const int4* __restrict__ taps,
               float* __restrict__ out,
               int N, int C, int H, int W, int F, int KH, int KW,
               int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    const int tid = threadIdx.x, K = C * KH * KW, P = OH * OW, NP = N * P;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    // This thread's B column: output pixel (n, oh, ow), whose window starts at (h0, w0);
    // its row k = (c, kh, kw) is x[n, c, h0 + kh, w0 + kw] = x_window[taps[k].x], inside the
    // image when 0 <= h0 + taps[k].y < H and 0 <= w0 + taps[k].z < W (see the table above).
    const int col = col0 + tid;
    const bool col_valid = col < NP;
    const int n = col_valid ? col / P : 0, p = col_valid ? col - n * P : 0;
    const int h0 = (p / OW) * SH - PT, w0 = (p % OW) * SW - PL;
    const unsigned rows = col_valid ? H : 0;             // a column past N*P: no row is inside
    const float* x_window = x + (n * C * H * W + h0 * W + w0);

    // A element (kk, mm) = w[f, k] at f = row0 + mm, mm = tid / BK + 8q, k = k0 + kk, kk = tid % BK
    // (a half-warp reads 16 neighbouring weights); B: each thread loads its whole column.
    const int kk_a = tid % BK;
    float acc[8][8] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        const int k_a = k0 + kk_a;
#pragma unroll
        for (int q = 0; q < A_LOADS; ++q) {
            const int mm = tid / BK + (THREADS / BK) * q, f = row0 + mm;
            s.a[kk_a][mm] = (f < F && k_a < K) ? w[f * K + k_a] : 0.0f;
        }
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            const int4 tap = taps[k0 + kk];
            const bool inside = (unsigned)(h0 + tap.y) < rows && (unsigned)(w0 + tap.z) < (unsigned)W;
            s.b[kk][tid] = inside ? x_window[tap.x] : 0.0f;
        }
        __syncthreads();
        multiply_tiles(s, acc, tid % 16, tid / 16);
        __syncthreads();
    }

    store_tile(acc, out, bias, F, P, NP, row0, col0, tid % 16, tid / 16);
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_data(const float* __restrict__ dout, const float* __restrict__ w,
                     float* __restrict__ dx,
                     int N, int C, int H, int W, int F, int KH, int KW,
                     int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    const int tid = threadIdx.x, KK = KH * KW, HW = H * W, NHW = N * HW, P = OH * OW;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;

    // This thread's B column: input pixel (n, h, wi).
    const int col = col0 + tid;
    const bool col_valid = col < NHW;
    const int n = col_valid ? col / HW : 0, hw = col_valid ? col - n * HW : 0;
    const int h = hw / W, wi = hw - h * W;
    const float* dout_n = dout + n * F * P;

    // Tap (kh, kw) of window (oh, ow) lands on (h, wi) when oh*SH = h + PT - kh and
    // ow*SW = wi + PL - kw. Keep h + PT - kh = oh*SH + oh_rem (0 <= oh_rem < SH) as kh grows,
    // likewise for kw: a hit is a zero remainder and an (oh, ow) inside the output.
    int oh = (h + PT) / SH, oh_rem = (h + PT) % SH;
    const int ow_first = (wi + PL) / SW, ow_rem_first = (wi + PL) % SW;
    float acc[8][8] = {};
    for (int kh = 0; kh < KH; ++kh) {
        int ow = ow_first, ow_rem = ow_rem_first;
        for (int kw = 0; kw < KW; ++kw) {
            const bool hit = col_valid && oh_rem == 0 && ow_rem == 0 && oh >= 0 && oh < OH
                             && ow >= 0 && ow < OW;
            // A[c, f] = w[f, c, kh, kw]; B[f, col] = dout[n, f, oh, ow]
            accumulate_tap(s, acc, tid, w + kh * KW + kw, C, row0, KK, C * KK,
                           dout_n + (hit ? oh * OW + ow : 0), hit, P, F);
            if (--ow_rem < 0) ow_rem += SW, --ow;
        }
        if (--oh_rem < 0) oh_rem += SH, --oh;
    }

    store_tile(acc, dx, nullptr, C, HW, NHW, row0, col0, tid % 16, tid / 16);
}

extern "C" __global__ void __launch_bounds__(THREADS)
conv2d_backward_weight(const float* __restrict__ x, const float* __restrict__ dout,
                       float* __restrict__ dw_part, int split_size,
                       int N, int C, int H, int W, int F, int KH, int KW,
                       int SH, int SW, int PT, int PL, int OH, int OW)
{
    __shared__ Tiles s;
    __shared__ int tap_offset[BN], tap_kh[BN], tap_kw[BN];     // column k's tap, see below
    const int tid = threadIdx.x, KK = KH * KW, K = C * KK, HW = H * W, P = OH * OW, NP = N * P;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    const int j_begin = blockIdx.z * split_size;                       // this block's (n, p) range
    const int j_end = j_begin + split_size < NP ? j_begin + split_size : NP;

    // Column k = (c, kh, kw) reads x[n, c, h + kh, w + kw] = x_at(n, h, w)[tap_offset[k]], inside
    // when 0 <= h + tap_kh[k] < H and 0 <= w + tap_kw[k] < W. A column past K gets a tap_kh so
    // negative that every h + tap_kh fails the (unsigned) test below: it reads nothing.
    {
        const int k = col0 + tid, c = k / KK, kh = (k % KK) / KW, kw = k % KW;
        tap_offset[tid] = k < K ? c * HW + kh * W + kw : 0;
        tap_kh[tid] = k < K ? kh : -(1 << 30);
        tap_kw[tid] = kw;
    }
    __syncthreads();

    // Loading: thread tid loads row kk = tid % BK of both tiles: the reduction index
    // j = j0 + kk = (n, oh, ow) is the same for its A and B elements, so one walk serves both,
    // and the 16 lanes of a half-warp read 16 neighbouring pixels of x and of dout (coalesced).
    // A[f, j] = dout[n, f, oh, ow] at f = row0 + tid / BK + 8q; B[j, k] at k = col0 + tid / BK + 8q.
    const int kk = tid % BK;
    int j = j_begin + kk, n = j / P, oh = (j % P) / OW, ow = j % OW;
    float acc[8][8] = {};
    for (int j0 = j_begin; j0 < j_end; j0 += BK, j += BK) {
        const bool j_valid = j < j_end;
        const int h = oh * SH - PT, wi = ow * SW - PL;                 // the window's corner
        const float* dout_j = dout + (n * F * P + oh * OW + ow);
        const float* x_j = x + (n * C * HW + h * W + wi);
#pragma unroll
        for (int q = 0; q < A_LOADS; ++q) {
            const int mm = tid / BK + (THREADS / BK) * q, f = row0 + mm;
            s.a[kk][mm] = (j_valid && f < F) ? dout_j[f * P] : 0.0f;
        }
#pragma unroll
        for (int q = 0; q < B_LOADS; ++q) {
            const int nn = tid / BK + (THREADS / BK) * q;
            const bool inside = (unsigned)(h + tap_kh[nn]) < (unsigned)H
                                && (unsigned)(wi + tap_kw[nn]) < (unsigned)W;
            s.b[kk][nn] = (j_valid && inside) ? x_j[tap_offset[nn]] : 0.0f;
        }
        __syncthreads();
        multiply_tiles(s, acc, tid % 16, tid / 16);
        __syncthreads();
        for (ow += BK; ow >= OW; ow -= OW)                             // j += BK, by increments
            if (++oh == OH) oh = 0, ++n;
    }

    store_tile(acc, dw_part + blockIdx.z * F * K, nullptr, F, K, K, row0, col0,
               tid % 16, tid / 16);
}
