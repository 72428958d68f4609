"""auto_LiRPA's API on robustkern's bound propagation: an auto_LiRPA script runs after changing its import lines.

    from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor          # from auto_LiRPA import ...
    from robustkern.compat.auto_lirpa.perturbations import *                      # from auto_LiRPA.perturbations
    from robustkern.compat.auto_lirpa.utils import MultiAverageMeter              # from auto_LiRPA.utils
    from robustkern.compat.auto_lirpa.eps_scheduler import SmoothedScheduler      # from auto_LiRPA.eps_scheduler

    lirpa_model = BoundedModule(model, dummy_input, bound_opts={"activation_bound_option": None})
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=x_L, x_U=x_U)
    out = lirpa_model(BoundedTensor(x, ptb))
    ilb, iub = lirpa_model.compute_bounds(IBP=True, C=C, method=None)               # IBP
    clb, _ = lirpa_model.compute_bounds(IBP=False, C=C, method="backward", bound_upper=False)  # CROWN-IBP

Methods: IBP, CROWN-IBP, CROWN and alpha-CROWN ("CROWN-Optimized", ``bound_opts["optimize_bound_args"]``)
(``bounded_module``: auto_LiRPA's method names and its rule for reusing the intermediate bounds of the previous
call); L-inf and L2 perturbations (``perturbations``); auto_LiRPA's epsilon
schedulers (``eps_scheduler``) and ``MultiAverageMeter``/``logger`` (``utils``).

Differences from auto_LiRPA:
- ``bound_opts={"sound": True}`` widens every bound by its floating-point rounding error (certificates);
  the default False gives auto_LiRPA's numbers.
- CROWN's intermediate bounds are intersected with IBP's (auto_LiRPA keeps CROWN's alone unless
  ``compare_crown_with_ibp``), so CROWN bounds can be tighter than auto_LiRPA's; IBP and CROWN-IBP are the same.
- Stale stored bounds (parameters, perturbation or mode changed since) are an error, not silently reused.
- alpha-CROWN's result is never looser than CROWN's (the element-wise best of CROWN and every iterate), which
  can make it tighter than auto_LiRPA's for the same ``optimize_bound_args``; beta-CROWN is not supported.
- ``return_A`` gives the output's linear bounds over the input (CROWN-IBP, CROWN, alpha-CROWN: per row, those
  of the pass behind the returned bound), no other node's A matrices.
- Not supported, each a one-line ``NotImplementedError`` at use that says what to use instead: forward modes,
  ``final_node_name``, ``interm_bounds``, perturbed parameters
  (``BoundedParameter``), L0/L1/synonym/linear perturbations, ``CrossEntropyWrapper`` bounding (loss fusion:
  ``robustkern.bounds.crown_ibp_loss(..., loss_fusion=True)``), ``register_custom_op``, several inputs.
  ``BoundDataParallel`` runs the whole batch on the module's device.
"""
from .bounded_module import BoundedModule
from .bounded_tensor import BoundedParameter, BoundedTensor
from .perturbations import (Perturbation, PerturbationL0Norm, PerturbationLinear, PerturbationLpNorm,
                            PerturbationSynonym)
from .wrapper import (BoundDataParallel, CrossEntropyWrapper, CrossEntropyWrapperMultiInput, register_custom_op,
                      unregister_custom_op)

__all__ = ["BoundedModule", "BoundedTensor", "BoundedParameter", "Perturbation", "PerturbationLpNorm",
           "PerturbationL0Norm", "PerturbationSynonym", "PerturbationLinear", "BoundDataParallel",
           "CrossEntropyWrapper", "CrossEntropyWrapperMultiInput", "register_custom_op", "unregister_custom_op"]
