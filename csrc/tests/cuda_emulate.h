// Runs csrc/cuda_kernels.cu as plain C++ on CPU tensors, so that the CUDA kernels' indexing and
// math (and their ATen launchers) are tested on machines without a GPU. Block-cooperative kernels
// run one thread per block (blockDim 1: the kernels take their warp geometry from blockDim, and
// block_sum degenerates to the identity); independent-thread kernels run every thread of every
// block. Include this, then cuda_kernels.cu. Concurrency (barriers, shuffles across 32 lanes) is
// what this cannot check; compile_check_cuda.sh compiles the real thing, a GPU runs it.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#define DZ_CUDA_EMULATE 1

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
inline dim3 threadIdx{0, 0}, blockIdx{0, 0}, blockDim{1};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
using std::isfinite;

inline void __syncthreads() {}
template <typename T>
T __shfl_down_sync(unsigned, T, int) {  // never reached: the warp width is 1 here
  return T(0);
}

#define DZ_DEVICE_GUARD(t) (void)(t)

template <typename F>
void dz_emu_launch(dim3 grid, unsigned threads, F f) {
  blockDim.x = threads;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned b = 0; b < grid.x; ++b) {
      blockIdx.x = b, blockIdx.y = y;
      for (unsigned t = 0; t < threads; ++t) {
        threadIdx.x = t;
        f();
      }
    }
  threadIdx.x = blockIdx.x = blockIdx.y = 0;
  blockDim.x = 1;
}

#define DZ_LAUNCH_BLOCK(kernel, grid, block, smem, ...) dz_emu_launch((grid), 1u, [&] { kernel(__VA_ARGS__); })
#define DZ_LAUNCH_FLAT(kernel, grid, block, smem, ...) \
  dz_emu_launch((grid), unsigned(block), [&] { kernel(__VA_ARGS__); })
