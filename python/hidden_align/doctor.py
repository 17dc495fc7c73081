"""What this installation of hidden_align can do here, and whether it computes correctly.

``hidden-align doctor`` (``hidden_align.cli``) prints, one line per check (``ok``, ``FAIL`` or
``skip`` with the reason): the versions of hidden_align, PyTorch, Python and the RL frameworks it
integrates with; the backends available; where the CUDA driver and NVRTC were found or why not;
a kernel compile for each GPU present; and a small correctness self-check of every available
backend against float64 formulas written here in plain PyTorch. Missing GPU pieces are ``skip``
on a machine without a GPU and ``FAIL`` on one where PyTorch sees a GPU. The exit status is 1
when any check fails.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

OK, FAIL, SKIP = "ok", "FAIL", "skip"


@dataclass
class Check:
    section: str
    name: str
    status: str
    detail: str = ""


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def check_versions() -> list:
    import hidden_align as ha

    where = os.path.dirname(ha.__file__)
    out = [Check("versions", "hidden_align", OK, f"{ha.__version__} ({where})")]
    cuda = torch.version.cuda
    built = f"built with CUDA {cuda}" if cuda else "CPU-only build"
    out.append(Check("versions", "torch", OK, f"{torch.__version__} ({built})"))
    py = f"{platform.python_version()} ({sys.executable})"
    out.append(Check("versions", "Python", OK, py))
    # The frameworks are looked up by their installed metadata, not imported (verl alone takes
    # seconds to import and may warn about missing optional pieces).
    for label, dist in (("verl", "verl"), ("OpenRLHF", "openrlhf"), ("TRL", "trl")):
        v = _version(dist)
        out.append(Check("versions", label, OK if v else SKIP, v or "not installed"))
    return out


def _gpu_seen() -> bool:
    """A GPU that PyTorch can use: then anything missing on the CUDA side is a failure."""
    return torch.cuda.is_available()


def _not_usable() -> str:
    """Why there is no GPU check to run, for skip lines."""
    if torch.version.cuda is None:
        return "PyTorch is a CPU-only build"
    return "PyTorch sees no CUDA GPU"


def check_backends() -> list:
    import hidden_align as ha

    status = ha.cuda_status()
    simd = ha.simd_levels()
    forced = "" if simd["level"] == simd["best"] else f", lowered from {simd['best']}"
    out = [
        Check("backends", "cpu", OK, "Rust kernels (always available)"),
        Check(
            "backends",
            "cpu simd",
            OK,
            f"{simd['level']}{forced} (this CPU: {', '.join(simd['available'])};"
            " HIDDEN_ALIGN_SIMD lowers it)",
        ),
    ]
    if status.get("emulation_built"):
        blocks = status.get("emulated_blocks")
        out.append(
            Check(
                "backends", "cuda-emulated", OK, f"CUDA kernels on CPU tensors, {blocks} block(s)"
            )
        )
    else:
        out.append(
            Check("backends", "cuda-emulated", SKIP, "not in this build (test builds have it)")
        )
    if status.get("available"):
        out.append(Check("backends", "cuda", OK, f"{status.get('devices')} device(s)"))
    else:
        reason = status.get("reason") or _not_usable()
        out.append(Check("backends", "cuda", FAIL if _gpu_seen() else SKIP, reason))
    out.append(Check("backends", "selected", OK, ha.get_backend()))
    return out


def _ver(v) -> str:
    if isinstance(v, (list, tuple)):
        return ".".join(str(x) for x in v)
    return str(v)


def _loaded_library(prefix: str) -> str | None:
    """The file of a shared library this process has mapped (Linux), e.g. the driver that the
    native module opened by its soname."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


def check_cuda_libraries() -> list:
    import hidden_align as ha

    status = ha.cuda_status()
    gpu = _gpu_seen()
    out = []
    if status.get("driver_found"):
        where = _loaded_library("libcuda.so") or "libcuda.so.1 on the loader path"
        version = _ver(status.get("driver_version"))
        out.append(Check("CUDA", "driver", OK, f"driver API {version} at {where}"))
    else:
        why = status.get("reason") or "libcuda.so.1 not found"
        out.append(Check("CUDA", "driver", FAIL if gpu else SKIP, why))
    if status.get("nvrtc_found") and status.get("nvrtc_path"):
        detail = f"{_ver(status.get('nvrtc_version'))} at {status['nvrtc_path']}"
        out.append(Check("CUDA", "NVRTC", OK, detail))
    else:
        searched = status.get("nvrtc_search")
        why = status.get("nvrtc_error") or (
            f"not found; searched {searched}" if searched else "not found"
        )
        out.append(Check("CUDA", "NVRTC", FAIL if gpu else SKIP, why))
    return out


def check_kernel_compile() -> list:
    import hidden_align as ha

    status = ha.cuda_status()
    if not torch.cuda.is_available():
        return [Check("kernels", "compile", SKIP, _not_usable())]
    if not status.get("available"):
        return [Check("kernels", "compile", FAIL, status.get("reason") or "CUDA backend unusable")]
    out = []
    for index in range(torch.cuda.device_count()):
        name = f"cuda:{index} {torch.cuda.get_device_name(index)}"
        major, minor = torch.cuda.get_device_capability(index)
        cc = f"sm_{major}{minor}"
        t0 = time.perf_counter()
        try:
            ha.prepare_cuda(f"cuda:{index}")
        except Exception as e:
            out.append(Check("kernels", name, FAIL, f"{cc}: {type(e).__name__}: {e}"))
            continue
        ms = (time.perf_counter() - t0) * 1e3
        after = ha.cuda_status()
        target = after.get("kernel_target")
        reason = after.get("kernel_target_reason")
        detail = f"{cc}: compiled and loaded in {ms:.0f} ms (disk cache: {_cache_dir()})"
        if target:
            detail += f"; target {target}" + (f" ({reason})" if reason else "")
        out.append(Check("kernels", name, OK, detail))
    return out


def _cache_dir() -> str:
    value = os.environ.get("HIDDEN_ALIGN_CACHE_DIR")
    if value is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "hidden_align")
    return value or "off"


# ---- self-check ------------------------------------------------------------------------------


def _cosine_loss_f64(hidden, index, rewards, group_size, eps=1e-8):
    """Mean over valid groups of the mean ``1 - cos`` over ordered pairs of correct anchored
    rollouts (groups of ``group_size`` consecutive rollouts), in float64, one loop per pair."""
    h = hidden.double()
    total, valid = h.sum() * 0, 0
    for g in range(0, index.shape[0], group_size):
        members = [
            b for b in range(g, g + group_size) if int(index[b]) >= 0 and float(rewards[b]) > 0.5
        ]
        u = [h[b, int(index[b])] / h[b, int(index[b])].norm().clamp_min(eps) for b in members]
        terms = [1 - u[i] @ u[j] for i in range(len(u)) for j in range(len(u)) if i != j]
        if terms:
            total = total + torch.stack(terms).mean()
            valid += 1
    return total / valid if valid else total


def _policy_loss_f64(logp, old, adv, mask, low=0.2, high=0.28, c=10.0):
    lp, old, adv, m = logp.double(), old.double(), adv.double(), mask.double()
    ratio = torch.exp(torch.clamp(lp - old, -20, 20))
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - low, 1 + high)
    c1 = torch.maximum(l1, l2)
    tok = torch.where(adv < 0, torch.minimum(-adv * c, c1), c1)
    return (tok * m).sum() / m.sum()


def _anchors_loop(ids, mask, markers, offset=-1):
    """The token before the last match (greatest start, then longest) inside the response."""
    out = []
    for row, live in zip(ids.tolist(), (mask != 0).tolist()):
        t, hits = len(row), []
        for s in range(t):
            for m in markers:
                if s + len(m) <= t and all(
                    row[s + j] == m[j] and live[s + j] for j in range(len(m))
                ):
                    hits.append((s, len(m)))
        s = max(hits)[0] if hits else None
        out.append(s + offset if s is not None and 0 <= s + offset < t else -1)
    return out


def _advantages_f64(scores, group_size, eps=1e-6):
    s = scores.double().view(-1, group_size)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)).view(-1)


def _compare(name, got, want, tol) -> str | None:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=10 * tol, atol=tol):
        err = (got - want).abs().max().item()
        return f"{name}: max abs error {err:.3g} > {tol:g}"
    return None


def self_check(backend: str, device: str) -> list:
    """Small random inputs through ``backend`` on ``device``: values and gradients against the
    float64 formulas above. Returns the list of mismatches (empty when everything agrees)."""
    import hidden_align as ha

    gen = torch.Generator().manual_seed(1234)
    errors = []
    b, t, h, g = 12, 10, 40, 4  # H not a multiple of a warp, groups of 4
    hidden = torch.randn(b, t, h, generator=gen, dtype=torch.float64)
    index = torch.randint(0, t, (b,), generator=gen)
    index[[1, 6]] = -1
    rewards = torch.tensor([1.0, 1.0, 1.0, -1.0] * 3)
    want_leaf = hidden.clone().requires_grad_()
    want = _cosine_loss_f64(want_leaf, index, rewards, g)
    want.backward()

    bs, ts = 6, 24
    logp = -torch.rand(bs, ts, generator=gen, dtype=torch.float64) * 3
    old = logp + (torch.rand(bs, ts, generator=gen, dtype=torch.float64) - 0.5) * 0.8
    adv = torch.randn(bs, ts, generator=gen, dtype=torch.float64)
    mask = (torch.arange(ts)[None] < torch.randint(1, ts + 1, (bs, 1), generator=gen)).double()
    want_lp = logp.clone().requires_grad_()
    want_pg = _policy_loss_f64(want_lp, old, adv, mask)
    want_pg.backward()

    ids = torch.randint(3, 50, (5, 33), generator=gen)
    markers = [[1, 2], [0, 1, 2]]
    ids[0, 4:6] = torch.tensor([1, 2])
    ids[0, 20:23] = torch.tensor([0, 1, 2])
    ids[1, 0:2] = torch.tensor([1, 2])  # anchor would be -1: before the row
    ids[2, 10:12] = torch.tensor([1, 2])
    ids[3, 30:33] = torch.tensor([0, 1, 2])  # partly outside the response below
    in_response = torch.ones(5, 33, dtype=torch.bool)
    in_response[3, 31:] = False
    want_anchors = torch.tensor(_anchors_loop(ids, in_response, markers))

    scores = torch.randn(b, generator=gen)
    want_adv = _advantages_f64(scores, g)

    def on(x, dtype=torch.float32):
        return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)

    with ha.backend(backend):
        leaf = on(hidden).requires_grad_()
        got = ha.loss(leaf, on(index), on(rewards), group_size=g)
        got.backward()
        errors.append(_compare("loss value", got, want, 1e-5))
        errors.append(_compare("loss grad", leaf.grad, want_leaf.grad, 1e-5))

        lp = on(logp).requires_grad_()
        pg, _metrics = ha.dapo.policy_loss(lp, on(old), on(adv), on(mask))
        pg.backward()
        errors.append(_compare("policy_loss value", pg, want_pg, 1e-5))
        errors.append(_compare("policy_loss grad", lp.grad, want_lp.grad, 1e-5))

        anchors = ha.find_anchors(on(ids), on(in_response), markers)
        if not torch.equal(anchors.cpu(), want_anchors):
            errors.append(f"find_anchors: {anchors.tolist()}, expected {want_anchors.tolist()}")

        adv_got = ha.dapo.group_advantages(on(scores), group_size=g)
        errors.append(_compare("group_advantages", adv_got, want_adv, 1e-5))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return [e for e in errors if e]


def check_self() -> list:
    import hidden_align as ha

    status = ha.cuda_status()
    targets = [("cpu", "cpu")]
    if status.get("emulation_built"):
        targets.append(("cuda-emulated", "cpu"))
    if status.get("available") and torch.cuda.is_available():
        targets.append(("cuda", "cuda"))
    out = []
    what = "loss, policy_loss (value and grad), find_anchors, group_advantages vs float64"
    for backend, device in targets:
        try:
            errors = self_check(backend, device)
        except Exception as e:
            out.append(Check("self-check", backend, FAIL, f"{type(e).__name__}: {e}"))
            continue
        status_ = FAIL if errors else OK
        out.append(Check("self-check", backend, status_, "; ".join(errors) or what))
    if not status.get("emulation_built"):
        out.append(Check("self-check", "cuda-emulated", SKIP, "not in this build"))
    if not (status.get("available") and torch.cuda.is_available()):
        reason = status.get("reason") if torch.cuda.is_available() else _not_usable()
        out.append(
            Check("self-check", "cuda", FAIL if _gpu_seen() else SKIP, reason or _not_usable())
        )
    return out


# The checks in the order they are printed; looked up by name at run time.
CHECKS = (
    "check_versions",
    "check_backends",
    "check_cuda_libraries",
    "check_kernel_compile",
    "check_self",
)


def run_checks() -> list:
    """Every check; a check that raises is reported as a failure of its section."""
    out = []
    module = sys.modules[__name__]
    for name in CHECKS:
        fn: Callable = getattr(module, name)
        try:
            out += fn()
        except Exception as e:
            section = name.removeprefix("check_").replace("_", " ")
            out.append(Check(section, "check", FAIL, f"{type(e).__name__}: {e}"))
    return out


def format_checks(checks: list) -> str:
    lines, section = [], None
    for c in checks:
        if c.section != section:
            section = c.section
            lines.append(section)
        lines.append(
            f"  {c.status:<4}  {c.name}: {c.detail}" if c.detail else f"  {c.status:<4}  {c.name}"
        )
    counts = {s: sum(c.status == s for c in checks) for s in (OK, SKIP, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[SKIP]} skipped, {counts[FAIL]} failed")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    """Runs the checks, prints them (as JSON with ``as_json``); 1 when any failed, else 0."""
    checks = run_checks()
    if as_json:
        import json
        from dataclasses import asdict

        print(json.dumps([asdict(c) for c in checks], indent=1))
    else:
        print(format_checks(checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
