"""The fast maths: every forward/backward pair of minicnn.reference, with the same signatures and
cache contract, made fast with worker threads (minicnn.parallel.workers), cache-sized chunks
and channels-last memory. Each function names its reference in its docstring and says in one line
what it does differently ("Reference: ... / Differs: ..."); tests/test_reference.py proves each
equal to it. Why each trick pays, measured, is in docs/performance.md.

    im2col.py   im2col/col2im in the teaching layout and their channels-last twins
    conv.py     conv2d_forward/backward: chunked GEMMs, the bias as a GEMM column, and the
                dx strategies (dx_strategy: as a convolution, tap by tap, dcols + col2im)
    pool.py     max and average pooling (optionally padded); the 2x2 max-pool in two halving
                steps; global average pooling
    basic.py    dense, ReLU, softmax, dropout, batch norm on wide channel rows, the loss
"""
from minicnn.ops.im2col import conv_output_size, im2col, col2im, same_padding
from minicnn.ops.conv import conv2d_forward, conv2d_backward, conv2d_path
from minicnn.ops.pool import (maxpool2d_forward, maxpool2d_backward,
                              avgpool2d_forward, avgpool2d_backward,
                              global_avgpool2d_forward, global_avgpool2d_backward, pool2d_path)
from minicnn.ops.basic import (dense_forward, dense_backward, relu_forward, relu_backward,
                               softmax, log_softmax, softmax_backward,
                               dropout_forward, dropout_backward,
                               batchnorm_forward, batchnorm_backward,
                               batchnorm_inference,
                               softmax_cross_entropy)

# the pairs minicnn.reference also has, by the same names (minicnn.implementation swaps them);
# conv2d_path and pool2d_path (the path a layer takes, in words, for model.summary()) are not
# among them: the reference has one path
__all__ = ["conv_output_size", "same_padding", "im2col", "col2im",
           "conv2d_forward", "conv2d_backward",
           "maxpool2d_forward", "maxpool2d_backward", "avgpool2d_forward", "avgpool2d_backward",
           "global_avgpool2d_forward", "global_avgpool2d_backward",
           "dense_forward", "dense_backward", "relu_forward", "relu_backward",
           "softmax", "log_softmax", "softmax_backward", "dropout_forward", "dropout_backward",
           "batchnorm_forward", "batchnorm_backward", "batchnorm_inference",
           "softmax_cross_entropy"]
