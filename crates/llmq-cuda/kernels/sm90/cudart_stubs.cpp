// cudart_stubs.cpp: stand-ins for the CUDA runtime functions that fp8_swiglu_host.cu's object
// refers to. nvcc's host stub registers that translation unit's fatbin (CUTLASS's headers define
// device variables) when the program loads, and CUTLASS's host code calls cudaGetDevice and
// cudaDeviceGetAttribute only when it is given no SM count (never here: the caller passes it).
// llmq-cuda drives CUDA through the driver API alone and links no libcudart, so these weak no-op
// definitions satisfy the linker; a program that links libcudart gets the real ones. Plain C++
// (no CUDA headers), so the declarations use the ABI types: cudaError_t is an int-sized enum.
#include <cstddef>

extern "C" {
__attribute__((weak)) void** __cudaRegisterFatBinary(void*) {
    static void* handle = nullptr;
    return &handle;
}
__attribute__((weak)) void __cudaRegisterFatBinaryEnd(void**) {}
__attribute__((weak)) void __cudaUnregisterFatBinary(void**) {}
__attribute__((weak)) void __cudaRegisterVar(void**, char*, char*, const char*, int, size_t, int, int) {}
// 801 = cudaErrorNotSupported
__attribute__((weak)) int cudaGetDevice(int*) { return 801; }
__attribute__((weak)) int cudaDeviceGetAttribute(int*, int, int) { return 801; }
}
