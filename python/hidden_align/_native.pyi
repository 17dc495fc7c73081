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
def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int | None,
    eps: float,
    norm_by_std: bool,
    out: torch.Tensor,
) -> None: ...
def dynamic_sampling_mask(
    metric: torch.Tensor, group_ids: torch.Tensor | None, group_size: int | None, out: torch.Tensor
) -> None: ...
def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: float,
    buffer_length: float,
    penalty_factor: float,
    out: torch.Tensor,
) -> None: ...
def policy_loss_forward(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    clip: tuple[float, float, float, float | None],
    loss_agg_mode: str,
    batch_num_tokens: float | None,
    dp_size: int,
    global_batch_size: float | None,
    loss_scale_factor: float | None,
    out_scalars: torch.Tensor,
    out_row_scale: torch.Tensor,
    out_factor: torch.Tensor | None,
) -> None: ...
def policy_loss_backward(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    clip: tuple[float, float, float, float | None],
    row_scale: torch.Tensor,
    grad_output: float,
    out_grad: torch.Tensor,
    saved_factor: bool,
) -> None: ...
