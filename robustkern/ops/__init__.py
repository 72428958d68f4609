"""Public robustkern ops: the ``robustkern::`` operators of the op table (``robustkern.ops._registry``), each with a
checked Python entry point here. ``OPS`` maps names to the table's entries; ``load()`` loads the compiled
kernels and registers their fake kernels and autograd formulas (for ``torch.ops.robustkern.*``, ``opcheck`` and
``torch.compile``; robustkern's own calls do it on first use)."""
from .attacks import pgd_step
from .crown import crown_concretize, crown_relu_backward, crown_relu_backward_slopes
from .flatness import (conv2d_input_grad, linear_input_grad, relu_bits, relu_masked, relu_pack_mask,
                       softmax_ce_grad, softmax_curvature)
from .interval import interval_affine, interval_conv2d, interval_input_box, interval_linear
from .macer import macer_tail
from .smoothing import smoothing_count, smoothing_noise
from ._registry import OPS, cpu_options, load

__all__ = ["interval_linear", "interval_conv2d", "interval_affine", "interval_input_box", "pgd_step",
           "smoothing_noise", "smoothing_count", "crown_relu_backward", "crown_relu_backward_slopes", "crown_concretize",
           "macer_tail", "relu_pack_mask", "relu_bits", "relu_masked", "softmax_ce_grad", "softmax_curvature",
           "conv2d_input_grad", "linear_input_grad", "OPS", "load", "cpu_options"]
