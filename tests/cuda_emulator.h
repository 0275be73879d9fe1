// A CPU stand-in for just enough of CUDA to run kernels/*.cu in the tests on a machine without a
// GPU: each block runs as blockDim std::threads (so __syncthreads is a real barrier) and blocks
// run one after another (so __shared__ can be a static). Slow, and blind to races between
// blocks, but it executes the real kernel text with the real launch shapes, which checks the
// index maths and the argument list the Python wrappers pass.
//
// launch(kernel, grid, block, argv): argv[i] points at the i-th argument, as cuLaunchKernel's
// kernelParams; signature(kernel) spells the parameter types ("p" pointer, "i" int, "q" long
// long, "f" float) so the caller can check what it passes.
#include <barrier>
#include <cstddef>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct alignas(16) float4 { float x, y, z, w; };     // CUDA's vector types: aligned structs
struct alignas(16) int4 { int x, y, z, w; };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }

template <class... A, std::size_t... I>
void call_kernel(void (*kernel)(A...), void** argv, std::index_sequence<I...>)
{
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(argv[I])...);
}

template <class... A>
void launch(void (*kernel)(A...), dim3 grid, dim3 block, void** argv)
{
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x * block.y * block.z;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> barrier(threads);
                block_barrier = &barrier;
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([=] {
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        blockIdx = {bx, by, bz};
                        call_kernel(kernel, argv, std::index_sequence_for<A...>{});
                    });
                for (auto& th : pool) th.join();
            }
}

template <class T> constexpr char type_code()
{
    if constexpr (std::is_pointer_v<T>) return 'p';
    else if constexpr (std::is_same_v<T, int>) return 'i';
    else if constexpr (std::is_same_v<T, long long>) return 'q';
    else if constexpr (std::is_same_v<T, float>) return 'f';
    else return '?';
}

template <class... A>
std::string signature(void (*)(A...)) { return std::string{type_code<std::remove_cv_t<A>>()...}; }

#define EXPORT_KERNEL(name)                                                                        \
    extern "C" void launch_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, \
                                  unsigned bz, void** argv)                                        \
    {                                                                                              \
        launch(name, dim3{gx, gy, gz}, dim3{bx, by, bz}, argv);                                    \
    }                                                                                              \
    extern "C" const char* signature_##name()                                                      \
    {                                                                                              \
        static const std::string s = signature(name);                                              \
        return s.c_str();                                                                          \
    }
