/* FASTCONV_CLONES: a function compiled for AVX-512, AVX2 and plain x86-64, the CPU's best picked when the module
 * loads (GCC's target clones, on glibc), for plain C loops the compiler vectorizes while the build itself stays
 * generic (no -march). Elsewhere the one generic version. */
#ifndef FASTCONV_CLONES_H
#define FASTCONV_CLONES_H
#if defined(__x86_64__) && defined(__GNUC__) && defined(__GLIBC__)
#define FASTCONV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTCONV_CLONES
#endif
#endif
