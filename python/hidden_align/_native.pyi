# Type stubs of the Rust extension module. tests/test_stubs.py checks they match.

import torch

__version__: str

def align_forward(
    hidden: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int | None,
    cu_seqlens: torch.Tensor | None,
    loss_type: str,
    reduction: str,
    threshold: float,
    eps: float,
    tau: float,
    out_rows: torch.Tensor,
    out_groups: torch.Tensor,
    out_correct: torch.Tensor,
    out_group_loss: torch.Tensor,
    out_group_valid: torch.Tensor,
    out_scalars: torch.Tensor,
) -> int: ...
def align_backward(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    groups: torch.Tensor,
    correct: torch.Tensor,
    num_groups: int,
    grad_output: torch.Tensor,
    loss_type: str,
    reduction: str,
    eps: float,
    tau: float,
    out_grad_rows: torch.Tensor,
) -> None: ...
def scatter_add_rows(dst: torch.Tensor, rows: torch.Tensor, vals: torch.Tensor) -> None: ...
def data_ptr(tensor: torch.Tensor) -> int: ...
