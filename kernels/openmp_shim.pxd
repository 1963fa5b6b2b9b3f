# The OpenMP functions the kernels use, with serial stand-ins when the compiler has no OpenMP, so the same
# sources build either way (as scikit-learn's sklearn/utils/_openmp_helpers.pxd). Without OpenMP, Cython's
# prange runs serially.
cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define FASTCONV_OPENMP 1
    #else
        #define FASTCONV_OPENMP 0
        #define omp_get_thread_num() 0
        #define omp_get_max_threads() 1
    #endif
    """
    bint FASTCONV_OPENMP
    int omp_get_thread_num() noexcept nogil
    int omp_get_max_threads() noexcept nogil
