"""Public robustkern ops (``torch.library`` custom ops in the ``robustkern::`` namespace)."""
from .attacks import pgd_step
from .crown import crown_concretize, crown_relu_backward
from .flatness import (conv2d_input_grad, linear_input_grad, relu_bits, relu_masked, relu_pack_mask,
                       softmax_ce_grad, softmax_curvature)
from .interval import interval_affine, interval_conv2d, interval_input_box, interval_linear
from .macer import macer_tail
from .smoothing import smoothing_count, smoothing_noise

__all__ = ["interval_linear", "interval_conv2d", "interval_affine", "interval_input_box", "pgd_step",
           "smoothing_noise", "smoothing_count", "crown_relu_backward", "crown_concretize",
           "macer_tail", "relu_pack_mask", "relu_bits", "relu_masked", "softmax_ce_grad", "softmax_curvature",
           "conv2d_input_grad", "linear_input_grad"]
