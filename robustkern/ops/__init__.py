"""Public robustkern ops (``torch.library`` custom ops in the ``robustkern::`` namespace)."""
from .interval import interval_affine, interval_conv2d, interval_input_box, interval_linear

__all__ = ["interval_linear", "interval_conv2d", "interval_affine", "interval_input_box"]
