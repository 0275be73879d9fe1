"""The maths of every layer, as plain ``*_forward`` / ``*_backward`` function pairs.

Each forward returns ``(out, cache)``; each backward takes ``(dout, cache)`` and returns the
gradients. The functions take their array module from the arrays, so they run on NumPy and CuPy.
"""
from minicnn.ops.im2col import conv_output_size, im2col, col2im, same_padding, to_pair
from minicnn.ops.conv import conv2d_forward, conv2d_backward
from minicnn.ops.pool import (maxpool2d_forward, maxpool2d_backward,
                              avgpool2d_forward, avgpool2d_backward)
from minicnn.ops.basic import (dense_forward, dense_backward, relu_forward, relu_backward,
                               softmax, log_softmax, softmax_backward,
                               dropout_forward, dropout_backward,
                               batchnorm_forward, batchnorm_backward,
                               batchnorm_inference,
                               softmax_cross_entropy)
