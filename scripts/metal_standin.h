// A stand-in for what MLX puts before a custom Metal kernel (metal::utils(): <metal_stdlib>,
// `using namespace metal;`, `typedef bfloat bfloat16_t;`), for scripts/metal_compile.py. It declares
// only names that exist in the Metal Shading Language (3.1, as MLX's Metal backend requires), and only
// those the project's kernels use or might: a name Metal lacks (a CUDA intrinsic, fmaxf, __syncthreads)
// stays undeclared, so a body that uses one fails to compile. Compiled as C++ for OpenCL, whose clang
// front end knows address spaces as Metal does: device is __global, threadgroup __local, thread
// __private, and `constant` is the keyword both languages share. A pointer converted or cast from one
// address space to another is an error in both.
#pragma once

#define device __global
#define threadgroup __local
#define thread __private

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long int64_t;
typedef uchar uint8_t;
typedef ushort uint16_t;
typedef uint uint32_t;
typedef ulong uint64_t;
typedef ulong size_t;

#define GLM_VECTORS(T)                                  \
    typedef T T##2 __attribute__((ext_vector_type(2))); \
    typedef T T##3 __attribute__((ext_vector_type(3))); \
    typedef T T##4 __attribute__((ext_vector_type(4)));
GLM_VECTORS(float)
GLM_VECTORS(int)
GLM_VECTORS(uint)
GLM_VECTORS(short)
GLM_VECTORS(ushort)
GLM_VECTORS(char)
GLM_VECTORS(uchar)
#undef GLM_VECTORS

// Metal's bfloat (MSL 3.1): a 2-byte scalar that converts to and from float.
typedef __bf16 bfloat;

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")

namespace metal {

template <typename T, typename U>
inline T as_type(U u) {
    static_assert(sizeof(T) == sizeof(U), "as_type: the two types differ in size");
    return __builtin_bit_cast(T, u);
}

#define GLM_MATH1(F) float F(float);
GLM_MATH1(exp)
GLM_MATH1(exp2)
GLM_MATH1(log)
GLM_MATH1(log2)
GLM_MATH1(sqrt)
GLM_MATH1(rsqrt)
GLM_MATH1(sin)
GLM_MATH1(cos)
GLM_MATH1(tanh)
GLM_MATH1(abs)
GLM_MATH1(fabs)
GLM_MATH1(floor)
GLM_MATH1(ceil)
GLM_MATH1(round)
#undef GLM_MATH1
float fmax(float, float);
float fmin(float, float);
float pow(float, float);
float fma(float, float, float);
bool isnan(float);
bool isinf(float);
template <typename T> T min(T, T);
template <typename T> T max(T, T);
template <typename T> T clamp(T, T, T);

// SIMD-group functions on the scalar types the kernels reduce.
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
template <typename T> T simd_min(T);
template <typename T> T simd_prefix_exclusive_sum(T);
template <typename T> T simd_shuffle(T, ushort);
template <typename T> T simd_shuffle_xor(T, ushort);
template <typename T> T simd_shuffle_down(T, ushort);
template <typename T> T simd_shuffle_up(T, ushort);
template <typename T> T simd_broadcast(T, ushort);

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

}  // namespace metal

using namespace metal;
typedef bfloat bfloat16_t;
