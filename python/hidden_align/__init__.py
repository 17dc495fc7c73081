"""hidden_align: the Hidden-Align auxiliary loss and DAPO token-level math for PyTorch RL.

import hidden_align as ha
align = ha.loss(hidden, anchors, rewards, group_ids=uid)   # autograd scalar
pg, metrics = ha.dapo.policy_loss(log_prob, old_log_prob, advantages, response_mask)
logp, ent = ha.token_logprobs(hidden, lm_head.weight, targets, return_entropy=True)
"""

from . import dapo
from ._backend import (
    backend,
    cuda_status,
    get_backend,
    prepare_cuda,
    set_backend,
    set_simd_level,
    simd_levels,
)
from ._native import __version__
from .align import loss
from .anchors import find_anchors, marker_token_ids, unpadded_rows
from .errors import (
    ArgumentError,
    CudaUnavailableError,
    DeviceError,
    DtypeError,
    HiddenAlignError,
    KernelError,
    ShapeError,
)
from .logprobs import token_logprobs
from .row_reference import RowReference
from .stats import GroupAnchorStats, group_anchor_stats
from .text_markers import TextMarkers, text_markers

__all__ = [
    "ArgumentError",
    "CudaUnavailableError",
    "DeviceError",
    "DtypeError",
    "GroupAnchorStats",
    "HiddenAlignError",
    "KernelError",
    "RowReference",
    "ShapeError",
    "TextMarkers",
    "__version__",
    "backend",
    "cuda_status",
    "dapo",
    "find_anchors",
    "get_backend",
    "group_anchor_stats",
    "loss",
    "marker_token_ids",
    "prepare_cuda",
    "set_backend",
    "set_simd_level",
    "simd_levels",
    "text_markers",
    "token_logprobs",
    "unpadded_rows",
]
