"""The quantized operators of qcompile's ONNX IR (domain ``qcompile``).

The quantized IR is a valid ONNX model: each quantized weight becomes packed initializers feeding
one of these ops (canonical packing of :mod:`qcompile.passes.formats`, weight viewed as [N, K])::

    QMatMul(X[..., K], W0, W1?, scales[N, K/g], zeros[N, K/g]) -> Y[..., N]
        attrs: bits, group_size, N, K            Y = X @ dequantize(W).T
    QConv(X[B, C, H, W], W0, W1?, scales, zeros, bias?) -> Y[B, N, OH, OW]
        attrs: bits, group_size, N, K, kernel_shape, strides, pads, dilations
        (group == 1; K = C*kh*kw in ONNX's weight order)  Y = Conv(X, dequantize(W).reshape(N, C, kh, kw))

``W0``/``W1`` are the bit planes (``W1`` is empty for 2/4/8 bits).

Decoder attention (:mod:`qcompile.passes.fuse_attention`; Q/Y [B, H, S, Dh], K/V the S new
positions [B, KV, S, Dh], H a multiple of KV; float32)::

    CausalAttention(Q, K, V, K_past, V_past, past_positions?) -> Y[B, H, S, Dh]
        attrs: num_heads, num_kv_heads, scale
        P = len(past_positions) if given (K_past/V_past are then cache buffers [B, KV, C, Dh], C >= P,
        of which positions [0, P) are read), else P = K_past.shape[2];
        keys = Concat(K_past[:, :, :P], K), values likewise, key head of query head h: h // (H/KV);
        Y = softmax(Q · keysᵀ · scale + causal) · values,  causal: query t sees keys s <= P + t
    CacheUpdate(cache[B, KV, C, Dh], new[B, KV, S, Dh], past_positions[P]) -> cache'[B, KV, C, Dh]
        cache' = cache with positions [P, P + S) set to new (P + S <= C). Lowered in place: the input
        buffer is dead after its update (a graph input whose only other readers are CausalAttention
        ops reading positions [0, P)), so cache' is the same memory: the KV cache is allocated once.

``past_positions`` is int64 arange(P): only its length is read; it carries P as a symbolic dim.

Decoder elementwise blocks (:mod:`qcompile.passes.fuse_decoder`; float32)::

    RMSNorm(X[..., D], gamma[D]) -> Y[..., D]          attrs: epsilon
        Y = X / sqrt(mean(X², axis=-1) + epsilon) · gamma
    AddRMSNorm(A[..., D], B[..., D], gamma[D]) -> (Y[..., D], S[..., D])    attrs: epsilon
        S = A + B (no broadcasting),  Y = RMSNorm(S, gamma)      (a residual add and the norm after it)
    Rotary(X, cos, sin) -> Y[B, H, S, Dh]               attrs: heads_axis (1: X is [B, H, S, Dh];
        2: X is [B, S, H, Dh], heads not yet transposed)   cos/sin [S, Dh], [1, S, Dh] or [B|1, 1, S, Dh]
        Y = Xt·cos + rotate_half(Xt)·sin,  Xt = X as [B, H, S, Dh], rotate_half([a, b]) = [-b, a] (halves of Dh)
    GatedAct(gate[..., N], up[..., N]) -> Y[..., N]     attrs: activation (silu | gelu_tanh | gelu)
        Y = activation(gate) · up              (SwiGLU / GeGLU)
"""

DOMAIN = "qcompile"
QMATMUL = "QMatMul"
QCONV = "QConv"
ATTENTION = "CausalAttention"
CACHE_UPDATE = "CacheUpdate"
RMSNORM = "RMSNorm"
ADD_RMSNORM = "AddRMSNorm"
ROTARY = "Rotary"
GATED_ACT = "GatedAct"
OPSET = 1

__all__ = ["DOMAIN", "QMATMUL", "QCONV", "ATTENTION", "CACHE_UPDATE", "RMSNORM", "ADD_RMSNORM", "ROTARY",
           "GATED_ACT", "OPSET"]
