"""Every op of hidden_align against the code it replaces, in one run, on one device.

The references are what a training loop runs without this package: verl's own functions when
verl is installed (``compute_policy_loss_vanilla``, ``compute_grpo_outcome_advantage`` and, where
the installed verl has it, ``compute_grpo_vectorized_outcome_advantage``), the eager PyTorch
formulas below (in float32 and, for the alignment loss, float64) and ``torch.compile`` of them.
Providers of one op are timed round-robin in the same rounds, so each ratio compares timings taken
under the same conditions. On a GPU the timings come from CUDA events. Each op's time is also
expressed as a fraction of the device's measured bandwidth (device-to-device copy on a GPU, reading
on the CPU), counting the bytes the op must move at least (its floor).

``hidden-align bench`` (``hidden_align.cli``) runs :func:`run_bench` and prints
:func:`format_table` or the JSON of the result.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import hidden_align as ha
from hidden_align import dapo

OPS = ("loss", "find_anchors", "group_advantages", "policy_loss", "dynamic_sampling", "overlong")


# ---- timing ----------------------------------------------------------------------------------


def time_providers(
    fns: dict, reps: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict:
    """Median seconds per call of each callable, measured round-robin: one call of each per round,
    the order rotated every round, so that drift of the machine spreads evenly over providers and
    none always runs right after the same other one (inheriting its caches and heap).

    On CUDA each call is bracketed by CUDA events on the current stream and the end event is
    waited for before the next call, so a provider's time is its device time including any host
    synchronisation it does itself (verl's ``.item()`` metrics)."""
    device = torch.device(device)
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    samples: dict = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def read_bandwidth(nbytes: int, reps: int = 10) -> float:
    """The CPU's read bandwidth in bytes/s: a sum over ``nbytes`` of float32, with PyTorch's
    threads (the sum's arithmetic is far below what the cores can do, so the reading bounds
    it). The floors of the ops are reads for the most part, so this is the fraction's base."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    t = time_providers({"read": lambda: src.sum()}, reps, warmup=2)["read"]
    return nbytes / t


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s: a copy of ``nbytes`` reads and writes them."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_providers({"copy": lambda: dst.copy_(src)}, reps, warmup=2, device=device)["copy"]
    return 2 * nbytes / t


# ---- eager formulas (what a user writes in PyTorch) ------------------------------------------


def eager_cosine_loss(hidden, index, rewards, group_size, dtype=torch.float32, eps=1e-8):
    """The default alignment loss (cosine, mean over valid groups) for contiguous groups: gather
    the anchor rows, normalise, a per-group similarity matrix, the mean of ``1 - cos`` over
    ordered pairs of correct anchored rollouts, averaged over groups with at least one pair."""
    batch = index.shape[0]
    rows = torch.arange(batch, device=index.device)
    if hidden.dim() == 3:
        h = hidden[rows, index.clamp_min(0)]
    else:
        h = hidden[index.clamp_min(0)]
    u = F.normalize(h.to(dtype), dim=-1, eps=eps).view(batch // group_size, group_size, -1)
    ok = ((index >= 0) & (rewards > 0.5)).view(-1, group_size)
    eye = torch.eye(group_size, dtype=torch.bool, device=index.device)
    pair = ok[:, :, None] & ok[:, None, :] & ~eye
    sim = u @ u.transpose(1, 2)
    count = pair.sum((1, 2))
    valid = count > 0
    per_group = 1 - (sim * pair).sum((1, 2)) / count.clamp_min(1)
    return (per_group * valid).sum() / valid.sum().clamp_min(1)


def eager_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, clip_c=10.0, dtype=None):
    """DAPO's clipped token loss with dual clip, token-mean over the response mask (verl's
    ``compute_policy_loss_vanilla`` + ``agg_loss`` without the metrics)."""
    if dtype is not None:
        logp, old, adv, mask = logp.to(dtype), old.to(dtype), adv.to(dtype), mask.to(dtype)
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    tok = torch.where(adv < 0, torch.minimum(-adv * clip_c, c1), c1)
    return (tok * mask).sum() / mask.sum()


def _groups(ids):
    uniq, dense = torch.unique(ids, return_inverse=True)
    return uniq.numel(), dense


def eager_group_advantages(scores, ids, eps=1e-6, dtype=torch.float32):
    """GRPO outcome advantages from scores ``[B]`` or token rewards ``[B, T]``: per group mean and
    unbiased std via ``index_add_``; a singleton group has mean 0 and std 1 (as verl)."""
    if scores.dim() == 2:
        scores = scores.sum(-1)
    scores = scores.to(dtype)
    g, dense = _groups(ids)
    zeros = torch.zeros(g, dtype=dtype, device=scores.device)
    n = zeros.index_add(0, dense, torch.ones_like(scores))
    mean = zeros.index_add(0, dense, scores) / n
    var = zeros.index_add(0, dense, (scores - mean[dense]) ** 2) / (n - 1).clamp_min(1)
    single = n[dense] < 2
    mean = torch.where(single, 0.0, mean[dense])
    std = torch.where(single, 1.0, var.sqrt()[dense])
    return (scores - mean) / (std + eps)


def eager_dynamic_sampling_mask(metric, ids):
    """Keep a rollout when its group's metric is not constant or the group is a singleton."""
    g, dense = _groups(ids)
    m = metric.to(torch.float64)
    lo = torch.full((g,), float("inf"), dtype=m.dtype, device=m.device)
    hi = torch.full((g,), float("-inf"), dtype=m.dtype, device=m.device)
    lo = lo.scatter_reduce(0, dense, m, "amin")
    hi = hi.scatter_reduce(0, dense, m, "amax")
    n = torch.zeros(g, dtype=torch.long, device=m.device).index_add(
        0, dense, torch.ones_like(dense)
    )
    return ((hi > lo) | (n == 1))[dense]


def eager_overlong_penalty(lengths, max_len, buffer, factor=1.0):
    return torch.clamp(-(lengths - (max_len - buffer)) / buffer * factor, max=0.0)


def unfold_find_anchors(token_ids, response_mask, markers, offset=-1):
    """The last-occurrence search as a PyTorch user writes it: per spelling, ``unfold`` windows
    compared with the spelling and the mask, then the last hit per row (longest at a tie)."""
    b, t = token_ids.shape
    dev = token_ids.device
    cols = torch.arange(t, device=dev)
    best_start = torch.full((b,), -1, dtype=torch.long, device=dev)
    best_len = torch.zeros(b, dtype=torch.long, device=dev)
    live = response_mask != 0
    for m in markers:
        m = torch.as_tensor(m, device=dev)
        n = m.numel()
        if n > t:
            continue
        hit = (token_ids.unfold(1, n, 1) == m).all(-1) & live.unfold(1, n, 1).all(-1)
        start = torch.where(hit, cols[: t - n + 1], -1).amax(1)
        better = (start > best_start) | ((start == best_start) & (start >= 0) & (n > best_len))
        best_start = torch.where(better, start, best_start)
        best_len = torch.where(better, n, best_len)
    pos = best_start + offset
    return torch.where((best_start >= 0) & (pos >= 0) & (pos < t), pos, -1)


# ---- verl ------------------------------------------------------------------------------------


def load_verl():
    """verl's ``core_algos`` and an actor config with DAPO's clip settings, or (None, None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from verl.trainer.ppo import core_algos
            from verl.workers.config import ActorConfig

            config = ActorConfig(
                clip_ratio_low=0.2,
                clip_ratio_high=0.28,
                clip_ratio_c=10.0,
                strategy="fsdp",
                ppo_micro_batch_size_per_gpu=1,
                ppo_mini_batch_size=256,
                rollout_n=1,
            )
    except Exception:  # not installed, or an API this code does not know: eager stands in
        return None, None
    return core_algos, config


def verl_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("verl")
    except Exception:
        return None


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    shape: str
    provider: str
    provider_ms: float | None
    hidden_align_ms: float | None
    ratio: float | None  # provider time / hidden_align time: > 1 means hidden_align is faster
    # of hidden_align: the floor's bytes over its time, as a fraction of the device's measured
    # copy bandwidth (CUDA) or read bandwidth (CPU)
    bandwidth_fraction: float | None = None
    floor_bytes: int | None = None  # the bytes the op must move at least
    note: str = ""


@dataclass
class Result:
    device: str
    device_name: str
    reps: int
    quick: bool
    compile: str
    copy_bandwidth_gbs: float | None  # device-to-device copy on CUDA, read on the CPU
    versions: dict
    rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.rows]
        return d


@dataclass
class Case:
    """One op at one shape: the hidden_align call, the references, and the bytes of its floor.
    Each callable is the whole timed step (forward, and backward for ops with a gradient) and
    returns a tensor comparable to hidden_align's (checked once before timing)."""

    op: str
    shape: str
    ours: Callable
    providers: dict
    floor_bytes: int
    eager: Callable | None = None  # the formula torch.compile is applied to
    leaf: torch.Tensor | None = None  # for ops with a gradient: eager takes it, steps backward
    tolerance: float = 1e-3
    exact: bool = False


def _close(a, b, tol, exact) -> bool:
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    if exact or a.dtype == torch.bool:
        return bool(torch.equal(a.to(b.dtype), b))
    a, b = a.double().cpu(), b.double().cpu()
    return bool(torch.allclose(a, b, rtol=tol, atol=tol))


def _grad_step(leaf, fn):
    """A forward+backward step on ``leaf``; returns the loss value."""

    def step():
        leaf.grad = None
        out = fn(leaf)
        out.backward()
        return out

    return step


def _loss_case(dev, batch, seq, hidden_size, group, dtype, gen):
    # Drawn on the device: at GPU sizes hidden is gigabytes, slow to draw on the host.
    dgen = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, generator=dgen, device=dev).to(dtype)
    index = torch.randint(0, seq, (batch,), generator=gen)
    index[torch.rand(batch, generator=gen) < 0.1] = -1
    rewards = torch.where(torch.rand(batch, generator=gen) < 0.5, 1.0, -1.0)
    index, rewards = index.to(dev), rewards.to(dev)
    leaf = hidden.requires_grad_()

    def eager(h):
        return eager_cosine_loss(h, index, rewards, group)

    providers = {
        "eager float32": _grad_step(leaf, eager),
        "eager float64": _grad_step(
            leaf, lambda h: eager_cosine_loss(h, index, rewards, group, dtype=torch.float64)
        ),
    }
    es = hidden.element_size()
    return Case(
        "loss fwd+bwd",
        f"[{batch}, {seq}, {hidden_size}] {str(dtype)[6:]}, G={group}",
        _grad_step(leaf, lambda h: ha.loss(h, index, rewards, group_size=group)),
        providers,
        # read the anchor rows, write their gradient rows, and zero-fill the dense gradient of
        # hidden (a leaf with no other consumer needs one on both sides; it dominates)
        floor_bytes=batch * hidden_size * 2 * es + batch * seq * hidden_size * es,
        eager=eager,
        leaf=leaf,
        tolerance=2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4,
    )


SPELLINGS = [[16141, 25], [198, 16141, 25]]  # e.g. " Answer", ":" and "\n", "Answer", ":"


def _anchors_case(dev, batch, seq, gen):
    ids = torch.randint(30000, 151000, (batch, seq), generator=gen)  # ids no spelling uses
    lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    # Even rows hold the marker early in the response, odd rows none: the last-occurrence scan
    # reads each row from its end down to the match (the whole row when there is none).
    scanned = 0
    for b in range(batch):
        if b % 2 == 0:
            m = SPELLINGS[(b // 2) % 2]
            s = int(torch.randint(0, max(1, seq // 8), (1,), generator=gen))
            ids[b, s : s + len(m)] = torch.tensor(m)
            scanned += seq - s
        else:
            scanned += seq
    ids, mask = ids.to(dev), mask.to(dev)
    eager = lambda: unfold_find_anchors(ids, mask, SPELLINGS)  # noqa: E731
    return Case(
        "find_anchors",
        f"[{batch}, {seq}], 2 spellings",
        lambda: ha.find_anchors(ids, mask, SPELLINGS),
        {"torch unfold": eager},
        floor_bytes=scanned * (ids.element_size() + mask.element_size()) + batch * 8,
        eager=eager,
        exact=True,
    )


def _advantages_case(dev, batch, tokens, group, gen, core_algos):
    import numpy as np

    labels = (torch.arange(batch) // group)[torch.randperm(batch, generator=gen)]
    rewards = torch.zeros(batch, tokens)
    rewards[:, -1] = torch.where(torch.rand(batch, generator=gen) < 0.5, 1.0, -1.0)
    mask = torch.ones(batch, tokens)
    uids = np.array([f"uid-{int(i)}" for i in labels.tolist()], dtype=object)
    rewards, mask = rewards.to(dev), mask.to(dev)
    ids = dapo.group_ids_from_uids(uids).to(dev)
    providers = {}
    if core_algos is not None:
        grpo = core_algos.compute_grpo_outcome_advantage
        providers["verl grpo"] = lambda: grpo(rewards, mask, uids)[0][:, -1]
        vec = getattr(core_algos, "compute_grpo_vectorized_outcome_advantage", None)
        if vec is not None:
            providers["verl grpo_vectorized"] = lambda: vec(rewards, mask, uids)[0][:, -1]
    eager = lambda: eager_group_advantages(rewards, ids)  # noqa: E731
    providers["eager"] = eager
    return Case(
        "group_advantages",
        f"[{batch}, {tokens}], G={group} shuffled",
        lambda: dapo.group_advantages(rewards, group_ids=ids),
        providers,
        floor_bytes=batch * tokens * 4 + batch * 8 + batch * 4,
        eager=eager,
        tolerance=1e-4,
    )


def _policy_case(dev, batch, seq, dtype, gen, core_algos, config):
    logp = -torch.rand(batch, seq, generator=gen) * 3
    old = (logp + (torch.rand(batch, seq, generator=gen) - 0.5) * 0.6).to(dev, dtype)
    adv = torch.randn(batch, seq, generator=gen).to(dev, dtype)
    lengths = torch.randint(seq // 2, seq + 1, (batch, 1), generator=gen)
    mask = (torch.arange(seq)[None] < lengths).float().to(dev)
    leaf = logp.to(dev, dtype).requires_grad_()

    def eager(x):
        return eager_policy_loss(x, old, adv, mask)

    providers = {}
    if core_algos is not None:

        def verl(x):
            loss, _metrics = core_algos.compute_policy_loss_vanilla(
                old, x, adv, mask, "token-mean", config
            )
            if loss.dim():  # older verl returned the token losses unaggregated
                loss = core_algos.agg_loss(loss, mask, "token-mean")
            return loss

        providers["verl vanilla"] = _grad_step(leaf, verl)
    providers["eager"] = _grad_step(leaf, eager)
    es = leaf.element_size()
    low = dtype in (torch.bfloat16, torch.float16)
    return Case(
        "policy_loss fwd+bwd",
        f"[{batch}, {seq}] {str(dtype)[6:]}, token-mean",
        _grad_step(leaf, lambda x: dapo.policy_loss(x, old, adv, mask)[0]),
        providers,
        # log_prob, old_log_prob, advantages and the float mask read once, the gradient written
        floor_bytes=batch * seq * (4 * es + 4),
        eager=eager,
        leaf=leaf,
        tolerance=2e-2 if low else 1e-4,
    )


def _sampling_case(dev, batch, group, gen):
    ids = (torch.arange(batch) // group)[torch.randperm(batch, generator=gen)].to(dev)
    metric = (torch.rand(batch, generator=gen) > 0.5).float().to(dev)
    eager = lambda: eager_dynamic_sampling_mask(metric, ids)  # noqa: E731
    return Case(
        "dynamic_sampling_mask",
        f"[{batch}], G={group}",
        lambda: dapo.dynamic_sampling_mask(metric, group_ids=ids),
        {"eager": eager},
        floor_bytes=batch * (4 + 8 + 1),
        eager=eager,
        exact=True,
    )


def _overlong_case(dev, batch, gen):
    lengths = torch.randint(0, 4096, (batch,), generator=gen).to(dev)
    eager = lambda: eager_overlong_penalty(lengths, 4096, 512)  # noqa: E731
    return Case(
        "overlong_penalty",
        f"[{batch}]",
        lambda: dapo.overlong_penalty(lengths, 4096, 512),
        {"eager": eager},
        floor_bytes=batch * (8 + 4),
        eager=eager,
        tolerance=1e-6,
    )


def _cases(dev, quick, ops, core_algos, config):
    gen = torch.Generator().manual_seed(0)
    cuda = dev.type == "cuda"
    if quick:
        loss_shapes, anchor_shape, adv_shape = [(16, 8, 32, 4, torch.float32)], (8, 64), (32, 8, 4)
        policy_shapes, small = [(4, 16, torch.float32)], 32
    elif cuda:
        loss_shapes = [(256, 1024, 2048, 16, torch.bfloat16)]
        anchor_shape, adv_shape, small = (512, 8192), (8192, 32, 16), 8192
        policy_shapes = [(64, 8192, torch.float32), (64, 8192, torch.bfloat16)]
    else:
        loss_shapes = [(128, 256, 1024, 16, torch.float32)]
        anchor_shape, adv_shape, small = (256, 4096), (8192, 32, 16), 8192
        policy_dtypes = (torch.float32, torch.bfloat16)
        policy_shapes = [(64, t, dt) for t in (4096, 8192) for dt in policy_dtypes]
    builders = {
        "loss": lambda: [_loss_case(dev, *s, gen) for s in loss_shapes],
        "find_anchors": lambda: [_anchors_case(dev, *anchor_shape, gen)],
        "group_advantages": lambda: [_advantages_case(dev, *adv_shape, gen, core_algos)],
        "policy_loss": lambda: [
            _policy_case(dev, *s, gen, core_algos, config) for s in policy_shapes
        ],
        "dynamic_sampling": lambda: [_sampling_case(dev, small, adv_shape[2], gen)],
        "overlong": lambda: [_overlong_case(dev, small, gen)],
    }
    for op in OPS:
        if op in ops:
            yield from builders[op]()


def _compiled(case: Case):
    """``torch.compile`` of the case's eager formula, run once so that a failure (no compiler,
    an unsupported op) shows here; returns (callable, None) or (None, reason)."""
    try:
        fn = torch.compile(case.eager)
        step = fn if case.leaf is None else _grad_step(case.leaf, fn)
        step()
        return step, None
    except Exception as e:  # report and carry on: compile is one provider among several
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"torch.compile failed: {type(e).__name__}: {first[:120]}"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        usable = torch.cuda.is_available() and ha.cuda_status().get("available")
        return torch.device("cuda" if usable else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise RuntimeError(f"--device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    dev = torch.device(name)
    if dev.type == "cuda":
        status = ha.cuda_status()
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda: PyTorch sees no CUDA GPU")
        if not status.get("available"):
            raise RuntimeError(
                f"--device cuda: hidden_align's CUDA backend: {status.get('reason')}"
            )
    return dev


def run_bench(
    device: str = "auto",
    quick: bool = False,
    reps: int | None = None,
    compile: bool | None = None,
    ops=OPS,
    log: Callable | None = None,
) -> Result:
    """Times every op in ``ops`` against its references; see the module docstring."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if reps is None:
        reps = 3 if quick else (50 if cuda else 10)
    if compile is None:
        compile = not quick  # compiling takes seconds per formula: off for the quick smoke run
    core_algos, config = load_verl()
    if cuda:
        if dev.index is not None:
            torch.cuda.set_device(dev)
        dev = torch.device("cuda", torch.cuda.current_device())
        ha.prepare_cuda(dev)  # NVRTC compile outside the timings
        name = torch.cuda.get_device_name(dev)
        bandwidth = copy_bandwidth(dev, (64 << 20) if quick else (1 << 30))
    else:
        simd = ha.simd_levels()["level"]
        name = (
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads,"
            f" hidden_align SIMD {simd}"
        )
        bandwidth = read_bandwidth(1 << 30 if not quick else 64 << 20)
    versions = {
        "hidden_align": ha.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "verl": verl_version() if core_algos is not None else None,
    }
    result = Result(
        device=str(dev),
        device_name=name,
        reps=reps,
        quick=quick,
        compile="on" if compile else "off" + (" (--quick)" if quick else ""),
        copy_bandwidth_gbs=None if bandwidth is None else bandwidth / 1e9,
        versions=versions,
    )
    for case in _cases(dev, quick, ops, core_algos, config):
        if log:
            log(f"{case.op} {case.shape}")
        providers = dict(case.providers)
        notes = {}
        if compile and case.eager is not None:
            fn, why = _compiled(case)
            if fn is None:
                notes["torch.compile"] = why
            else:
                providers["torch.compile"] = fn
        ours_value = case.ours()
        for pname, fn in providers.items():
            if not _close(fn(), ours_value, case.tolerance, case.exact):
                notes[pname] = "values differ from hidden_align"
        times = time_providers(
            {"hidden_align": case.ours, **providers}, reps, warmup=1 if quick else 3, device=dev
        )
        ours = times["hidden_align"]
        fraction = None
        if bandwidth:
            fraction = case.floor_bytes / ours / bandwidth
        for pname in list(providers) + [p for p in notes if p not in providers]:
            t = times.get(pname)
            result.rows.append(
                Row(
                    op=case.op,
                    shape=case.shape,
                    provider=pname,
                    provider_ms=None if t is None else t * 1e3,
                    hidden_align_ms=ours * 1e3,
                    ratio=None if t is None else t / ours,
                    bandwidth_fraction=fraction,
                    floor_bytes=case.floor_bytes,
                    note=notes.get(pname, ""),
                )
            )
        if cuda:
            torch.cuda.empty_cache()
    return result


def format_table(result: Result) -> str:
    """A Markdown table of the result, with a header line naming the run."""
    cuda = result.device.startswith("cuda")
    header = ["op", "shape", "provider", "provider ms", "hidden_align ms", "ratio"]
    header += ["floor MB", "of copy bandwidth" if cuda else "of read bandwidth"]
    header.append("note")
    lines = []
    v = result.versions
    title = (
        f"hidden_align {v['hidden_align']}, torch {v['torch']}, Python {v['python']}"
        f"{', verl ' + v['verl'] if v.get('verl') else ', verl not installed (eager formulas)'}"
    )
    lines.append(title)
    where = f"{result.device} ({result.device_name})"
    if result.copy_bandwidth_gbs:
        kind = "copy" if cuda else "read"
        where += f", {kind} bandwidth {result.copy_bandwidth_gbs:.0f} GB/s"
    timing = "CUDA events" if cuda else "wall clock"
    lines.append(
        f"{where}; median of {result.reps} ({timing}, providers interleaved); "
        f"torch.compile {result.compile}; ratio = provider ms / hidden_align ms"
    )
    lines.append("")
    rows = []
    for r in result.rows:
        cells = [
            r.op,
            r.shape,
            r.provider,
            "-" if r.provider_ms is None else f"{r.provider_ms:.3f}",
            "-" if r.hidden_align_ms is None else f"{r.hidden_align_ms:.3f}",
            "-" if r.ratio is None else f"{r.ratio:.1f}x",
        ]
        f = r.bandwidth_fraction
        cells.append("-" if r.floor_bytes is None else f"{r.floor_bytes / 1e6:.2f}")
        cells.append("-" if f is None else f"{100 * f:.0f}%")
        cells.append(r.note)
        rows.append(cells)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)
