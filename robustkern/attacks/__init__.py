"""Adversarial attacks and adversarial training (Madry et al. 2018; Zhang et al. 2019; Croce & Hein 2020).

* ``pgd``, ``fgsm`` and the torchattacks-style classes ``PGD``, ``PGDL2``, ``FGSM`` (``robustkern.attacks.pgd``)
* ``apgd``, ``apgd_targeted``, ``APGD``, ``APGDT``, DLR losses (``robustkern.attacks.apgd``)
* ``robust_accuracy``, ``evaluate_robust`` (AutoAttack-order APGD cascade) (``robustkern.attacks.evaluate``)
* training losses ``pgd_at_loss``, ``trades_loss`` (``robustkern.attacks.losses``) and large-eps schedules:
  extended adversarial training and IAT (``robustkern.attacks.schedules``)

The projected step of every attack is the fused op ``robustkern.ops.pgd_step``.
"""
from .apgd import APGD, APGDT, apgd, apgd_targeted, dlr_loss, dlr_loss_targeted
from .evaluate import STANDARD_ATTACKS, evaluate_robust, robust_accuracy
from .losses import pgd_at_loss, trades_loss
from .pgd import FGSM, PGD, PGDL2, Attack, attack_objective, fgsm, pgd
from .schedules import (adversarial_training_epoch, extended_adversarial_training, iat_schedule,
                        incremental_adversarial_training, madry_steps)

__all__ = ["pgd", "fgsm", "attack_objective", "Attack", "PGD", "PGDL2", "FGSM", "apgd", "apgd_targeted",
           "dlr_loss", "dlr_loss_targeted", "APGD", "APGDT", "robust_accuracy", "evaluate_robust",
           "STANDARD_ATTACKS", "pgd_at_loss", "trades_loss", "madry_steps", "iat_schedule",
           "adversarial_training_epoch", "extended_adversarial_training", "incremental_adversarial_training"]
