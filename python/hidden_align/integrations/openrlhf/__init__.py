"""OpenRLHF 0.11.1 and 0.11.2: the fused policy loss, and the alignment term in an unmodified
OpenRLHF.

* :class:`PolicyLoss` takes the constructor arguments and returns the outputs of the installed
  OpenRLHF's ``openrlhf.models.loss.PolicyLoss`` (:class:`PolicyLossV0111` or
  :class:`PolicyLossV0112`; the current release's, 0.11.2, when OpenRLHF is not installed).
* ``python -m hidden_align.integrations.openrlhf.train_ppo_ray <OpenRLHF's arguments>
  --align.coef 0.1 ...`` runs OpenRLHF's own ``train_ppo_ray`` with the alignment term
  (:mod:`~hidden_align.integrations.openrlhf.train_ppo_ray`; what it patches in every Ray
  worker: :mod:`~hidden_align.integrations.openrlhf.trainer`).
* :func:`capture_last_hidden` records a module's output (the backbone's) for one forward.

Importing this package with an OpenRLHF other than those in
:data:`SUPPORTED_OPENRLHF_VERSIONS` installed raises ``ImportError``, unless
``HIDDEN_ALIGN_ALLOW_UNTESTED_OPENRLHF=1`` (:func:`~.versions.policy_loss_class`).
"""

from __future__ import annotations

from .hidden import CapturedHidden, capture_last_hidden
from .policy_loss import PolicyLossV0111, PolicyLossV0112
from .versions import SUPPORTED_OPENRLHF_VERSIONS, installed_openrlhf_version, policy_loss_class

__all__ = [
    "SUPPORTED_OPENRLHF_VERSIONS",
    "CapturedHidden",
    "PolicyLoss",
    "PolicyLossV0111",
    "PolicyLossV0112",
    "capture_last_hidden",
    "installed_openrlhf_version",
    "policy_loss_class",
]

PolicyLoss = policy_loss_class()
