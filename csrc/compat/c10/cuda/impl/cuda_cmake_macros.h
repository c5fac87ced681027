// Stand-in for the header that CUDA builds of torch generate and CPU-only wheels omit. Only the CUDA
// compile check (compile_check_cuda.sh / CMake without a CUDA torch) puts csrc/compat on the include
// path; a real CUDA build uses torch's own copy.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
