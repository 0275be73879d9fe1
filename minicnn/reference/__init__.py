"""The readable reference engine: every operation of minicnn.ops in plain NCHW array code.

Read this before minicnn.ops. Each pair has the fast pair's signature and cache contract
(forward -> (out, cache), backward(dout, cache) -> gradients; a cache goes only to the backward
of the same implementation), so either can stand in for the other, and tests/test_reference.py
proves the two equal. The array module is taken from the arrays: NumPy or CuPy alike.

    conv.py        im2col, col2im, conv2d_forward/backward (one GEMM), conv_output_size,
                   same_padding
    pool.py        maxpool2d_forward/backward, avgpool2d_forward/backward (im2col + reduce,
                   optional padding), global_avgpool2d_forward/backward (a mean per channel)
    dense.py       dense_forward/backward
    activations.py relu_forward/backward, softmax, log_softmax, softmax_backward,
                   dropout_forward/backward
    batchnorm.py   batchnorm_forward/backward, batchnorm_inference
    loss.py        softmax_cross_entropy
    residual.py    add_forward/backward (a residual block's y = body(x) + shortcut(x))
    loops.py       conv2d_loops, pool2d_loops: nested loops, the specification (NumPy only)
"""
from minicnn.reference.conv import (conv_output_size, same_padding, im2col, col2im,
                                    conv2d_forward, conv2d_backward)
from minicnn.reference.pool import (maxpool2d_forward, maxpool2d_backward,
                                    avgpool2d_forward, avgpool2d_backward,
                                    global_avgpool2d_forward, global_avgpool2d_backward)
from minicnn.reference.dense import dense_forward, dense_backward
from minicnn.reference.activations import (relu_forward, relu_backward, softmax, log_softmax,
                                           softmax_backward, dropout_forward, dropout_backward)
from minicnn.reference.batchnorm import (batchnorm_forward, batchnorm_backward,
                                         batchnorm_inference)
from minicnn.reference.loss import softmax_cross_entropy
from minicnn.reference.residual import add_forward, add_backward
from minicnn.reference.loops import conv2d_loops, pool2d_loops

__all__ = [
    "conv_output_size", "same_padding", "im2col", "col2im", "conv2d_forward", "conv2d_backward",
    "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward",
    "global_avgpool2d_forward", "global_avgpool2d_backward",
    "dense_forward", "dense_backward",
    "relu_forward", "relu_backward", "softmax", "log_softmax", "softmax_backward",
    "dropout_forward", "dropout_backward",
    "batchnorm_forward", "batchnorm_backward", "batchnorm_inference",
    "softmax_cross_entropy", "add_forward", "add_backward", "conv2d_loops", "pool2d_loops",
]
