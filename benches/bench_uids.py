"""Group advantages straight from verl's uid array, against verl's
``compute_grpo_vectorized_outcome_advantage`` on the same input, in one run, on the CPU.

B=8192 rollouts (512 prompts x 16; the uid array built as verl builds it: one uuid4 string per
prompt, repeated by ``np.repeat`` for the rollouts, then shuffled as ``balance_batch`` would),
token-level scores ``[B, 64]`` with the reward at the last valid token. Ours hashes the uids in
Rust (``group_ids_from_uids``) and runs ``dapo.group_advantages``; verl's result is broadcast
over the response mask, so ours is timed both as ``[B]`` (what ``dapo.policy_loss`` takes) and
broadcast the same way. Also: the uid hash alone, against the same hash in Python (hashlib).

Usage: python benches/bench_uids.py [--reps 30]   (needs the parity extra: verl)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import interleaved_medians, load_verl, ms, write_table  # noqa: E402

from hidden_align import dapo  # noqa: E402

core_algos, _ = load_verl()
if core_algos is None:
    sys.exit("benches/bench_uids.py compares against verl: pip install -e '.[parity]'")


def hashlib_ids(uids):
    """The same ids computed in Python, one uid at a time."""
    out = [
        int.from_bytes(
            hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little", signed=True
        )
        for u in uids
    ]
    return torch.tensor(out, dtype=torch.int64)


def inputs(prompts=512, n=16, cols=64, seed=0):
    rng = np.random.default_rng(seed)
    uids = np.repeat(
        np.array(
            [str(uuid.UUID(int=int(rng.integers(2**62)))) for _ in range(prompts)], dtype=object
        ),
        n,
    )
    order = rng.permutation(len(uids))
    uids = uids[order]
    lengths = torch.as_tensor(rng.integers(1, cols + 1, len(uids)))
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(len(uids), cols)
    rewards[torch.arange(len(uids)), lengths - 1] = torch.as_tensor(
        rng.choice([-1.0, 1.0], len(uids))
    ).float()
    return uids, rewards, mask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    uids, rewards, mask = inputs()
    theirs, _ = core_algos.compute_grpo_vectorized_outcome_advantage(rewards, mask, uids)
    ours = dapo.group_advantages(rewards, group_ids=uids)
    torch.testing.assert_close(ours[:, None] * mask, theirs, rtol=1e-5, atol=1e-6)
    assert torch.equal(dapo.group_ids_from_uids(uids), hashlib_ids(uids))
    t = interleaved_medians(
        {
            "verl": lambda: core_algos.compute_grpo_vectorized_outcome_advantage(
                rewards, mask, uids
            ),
            "ours [B]": lambda: dapo.group_advantages(rewards, group_ids=uids),
            "ours broadcast": lambda: (
                dapo.group_advantages(rewards, group_ids=uids)[:, None] * mask
            ),
            "hash: hashlib": lambda: hashlib_ids(uids),
            "hash: ours": lambda: dapo.group_ids_from_uids(uids),
        },
        args.reps,
    )
    rows = [
        ["advantages, verl vectorized", ms(t["verl"]), "1.0x"],
        ["advantages [B], hidden_align", ms(t["ours [B]"]), f"{t['verl'] / t['ours [B]']:.1f}x"],
        [
            "advantages broadcast [B, 64], hidden_align",
            ms(t["ours broadcast"]),
            f"{t['verl'] / t['ours broadcast']:.1f}x",
        ],
        ["uid hash, hashlib in Python", ms(t["hash: hashlib"]), "1.0x"],
        [
            "uid hash, hidden_align",
            ms(t["hash: ours"]),
            f"{t['hash: hashlib'] / t['hash: ours']:.1f}x",
        ],
    ]
    print(
        write_table(
            "uid-advantages",
            f"Group advantages from verl's uid array, B=8192, 512 groups (median of {args.reps})",
            ["what", "ms", "speed-up"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
