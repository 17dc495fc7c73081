# Type stubs of the Rust extension module. tests/test_stubs.py checks they match.

from collections.abc import Iterable

import torch

__version__: str
POLICY_CHUNK: int
ALIGN_WORK_ROWS: int
ALIGN_LINK_ROWS: int
NVRTC_OPTIONS: list[str]

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
    out_loss: torch.Tensor,
    out_mean_cosine: torch.Tensor,
    out_counts: torch.Tensor,
    work: torch.Tensor | None = None,
    links: torch.Tensor | None = None,
    stream: int | None = None,
) -> tuple[int, bool]: ...
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
    kernel_state: tuple[torch.Tensor, ...] | None = None,
    centre: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def scatter_add_rows(
    dst: torch.Tensor,
    rows: torch.Tensor,
    vals: torch.Tensor,
    links: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def data_ptr(tensor: torch.Tensor) -> int: ...
def group_advantages(
    scores: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int | None,
    eps: float,
    norm_by_std: bool,
    out: torch.Tensor,
    totals: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def dynamic_sampling_mask(
    metric: torch.Tensor,
    group_ids: torch.Tensor | None,
    group_size: int | None,
    out: torch.Tensor,
    order: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: float,
    buffer_length: float,
    penalty_factor: float,
    out: torch.Tensor,
    stream: int | None = None,
) -> None: ...
def policy_loss_forward(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    clip: tuple[float, float, float, float | None],
    loss_agg_mode: str,
    batch_num_tokens: float | None,
    dp_size: int,
    global_batch_size: float | None,
    loss_scale_factor: float | None,
    out_loss: torch.Tensor,
    out_metrics: torch.Tensor,
    out_row_scale: torch.Tensor,
    out_factor: torch.Tensor | None,
    norm_tensors: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = ...,
    partials: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def policy_loss_backward(
    inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    clip: tuple[float, float, float, float | None],
    row_scale: torch.Tensor,
    grad_output: torch.Tensor,
    out_grad: torch.Tensor,
    saved_factor: bool,
    stream: int | None = None,
) -> None: ...
def set_emulated_blocks(n: int) -> None: ...
def set_backend(name: str) -> None: ...
def get_backend() -> str: ...
def set_simd_level(level: str | None = None) -> str: ...
def simd_levels() -> tuple[str, str, list[str]]: ...
def cuda_status() -> dict: ...
def kernel_programs() -> list[tuple[str, str]]: ...
def compile_kernels(arch: int, ptx: bool = False) -> list[tuple[str, int]]: ...
def prepare_cuda(ordinal: int) -> None: ...
def find_anchors(
    token_ids: torch.Tensor,
    response_mask: torch.Tensor,
    marker_tokens: torch.Tensor,
    marker_offsets: torch.Tensor,
    occurrence: str,
    offset: int,
    out: torch.Tensor,
    stream: int | None = None,
) -> None: ...
def find_text_anchors(
    token_ids: torch.Tensor,
    response_mask: torch.Tensor,
    vocab_bytes: torch.Tensor,
    vocab_offsets: torch.Tensor,
    token_starts: torch.Tensor,
    marker_bytes: torch.Tensor,
    marker_offsets: torch.Tensor,
    occurrence: str,
    offset: int,
    out: torch.Tensor,
    stream: int | None = None,
) -> None: ...
def text_marker_starts(
    vocab_bytes: torch.Tensor,
    vocab_offsets: torch.Tensor,
    marker_bytes: torch.Tensor,
    marker_offsets: torch.Tensor,
    out: torch.Tensor,
) -> None: ...
def uid_group_ids(uids: Iterable[object], out: torch.Tensor) -> None: ...
def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    out_logprob: torch.Tensor,
    out_stats: torch.Tensor,
    out_entropy: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
def accumulate_f32(grad_weight: torch.Tensor, partial: torch.Tensor) -> None: ...
def token_logprobs_backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    stats: torch.Tensor,
    entropy: torch.Tensor | None = None,
    grad_logprob: torch.Tensor | None = None,
    grad_entropy: torch.Tensor | None = None,
    stream: int | None = None,
) -> None: ...
