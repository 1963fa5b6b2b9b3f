# The row-major GEMM over scipy.linalg.cython_blas (column-major), as scikit-learn's _cython_blas does.
from cython cimport floating
from scipy.linalg.cython_blas cimport dgemm, sgemm


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k, const floating* a, int lda,
                      const floating* b, int ldb, floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C = op(A) @ op(B) + beta * C, as column-major BLAS's C^T = op(B)^T @ op(A)^T."""
    cdef char transa = b'T' if trans_a else b'N'
    cdef char transb = b'T' if trans_b else b'N'
    cdef floating one = 1
    if floating is float:
        sgemm(&transb, &transa, &n, &m, &k, &one, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&transb, &transa, &n, &m, &k, &one, <double*>b, &ldb, <double*>a, &lda, &beta, c, &ldc)
