"""The quantized operators of qcompile's ONNX IR (domain ``qcompile``).

The quantized IR is a valid ONNX model: each quantized weight becomes packed initializers feeding
one of these ops (canonical packing of :mod:`qcompile.passes.formats`, weight viewed as [N, K])::

    QMatMul(X[..., K], W0, W1?, scales[N, K/g], zeros[N, K/g]) -> Y[..., N]
        attrs: bits, group_size, N, K            Y = X @ dequantize(W).T
    QConv(X[B, C, H, W], W0, W1?, scales, zeros, bias?) -> Y[B, N, OH, OW]
        attrs: bits, group_size, N, K, kernel_shape, strides, pads, dilations
        (group == 1; K = C*kh*kw in ONNX's weight order)  Y = Conv(X, dequantize(W).reshape(N, C, kh, kw))

``W0``/``W1`` are the bit planes (``W1`` is empty for 2/4/8 bits).
"""

DOMAIN = "qcompile"
QMATMUL = "QMatMul"
QCONV = "QConv"
OPSET = 1

__all__ = ["DOMAIN", "QMATMUL", "QCONV", "OPSET"]
