"""SIMD vectors for Numba kernels: one register-wide vector type and the five operations a register tile needs.

LLVM's loop vectorizer keeps a loop's accumulators in memory, and its SLP vectorizer does not turn scalar
accumulators carried by a loop into vectors (scalar code with stack spills is what comes out). A vector-typed
Numba variable is an LLVM vector value, which the register allocator keeps in a register across the loop,
as a C kernel's intrinsics do. The width is 512 bits, AVX-512's registers: LLVM splits these vectors into
two 256-bit halves on CPUs without it, and auto-vectorized code would use 256 bits on CPUs that prefer them,
which runs at half the multiply-add rate of the 512-bit units of a Xeon.

Loads and stores read and write `lanes(a)` elements of a 1-D contiguous array from an index on, unchecked:
the caller keeps them in bounds. Numba's disk cache watches only the kernels' own file: after editing this
one, touch _numba_kernels.py (or clear __pycache__) so that cached kernels are rebuilt.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

VECTOR_BYTES = 64


class Vector(types.Type):
    """VECTOR_BYTES of a float dtype, as one LLVM vector."""

    def __init__(self, dtype):
        self.dtype, self.lanes = dtype, VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"Vector({dtype} x {self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(dmm.lookup(fe_type.dtype).get_value_type(), fe_type.lanes))


def _vector_pointer(context, builder, array_type, array, index, vector_type):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [index]), context.get_value_type(vector_type).as_pointer())


@intrinsic
def lanes(typingctx, array):
    """The number of elements of array's dtype in a vector (a compile-time constant)."""
    count = Vector(array.dtype).lanes

    def codegen(context, builder, signature, args):
        return context.get_constant(types.intp, count)
    return types.intp(array), codegen


@intrinsic
def vload(typingctx, array, index):
    """array[index:index + lanes] as a vector (no alignment needed)."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        pointer = _vector_pointer(context, builder, signature.args[0], args[0], args[1], vector)
        return builder.load(pointer, align=array.dtype.bitwidth // 8)
    return vector(array, index), codegen


@intrinsic
def vstore(typingctx, array, index, value):
    """array[index:index + lanes] = value."""
    def codegen(context, builder, signature, args):
        pointer = _vector_pointer(context, builder, signature.args[0], args[0], args[1], value)
        builder.store(args[2], pointer, align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(array, index, value), codegen


@intrinsic
def vsplat(typingctx, array, scalar):
    """A vector of array's dtype with every lane equal to scalar."""
    vector = Vector(array.dtype)

    def codegen(context, builder, signature, args):
        value = context.cast(builder, args[1], signature.args[1], array.dtype)
        undefined = ir.Constant(context.get_value_type(vector), ir.Undefined)
        first = builder.insert_element(undefined, value, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(first, undefined, ir.Constant(ir.VectorType(ir.IntType(32), vector.lanes),
                                                                    [0] * vector.lanes))
    return vector(array, scalar), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c in every lane, fused (one rounding)."""
    if not (isinstance(a, Vector) and a == b == c):
        return None

    def codegen(context, builder, signature, args):
        vector_type = args[0].type
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector_type, [vector_type] * 3),
                                             f"llvm.fma.v{a.lanes}f{a.dtype.bitwidth}")
        return builder.call(fma, args)
    return a(a, b, c), codegen
