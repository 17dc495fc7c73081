"""The synthetic task: multi-digit addition with a short worked trace and a verifier.

A prompt is ``"47+38=?"``; a target response adds one operand to the other place value by place
value, then gives the result after the answer marker: ``" 47+30=77 77+8=85 Answer: 85"``. The
trace has several correct spellings (which operand is split, highest or lowest place first), so
the correct rollouts of one prompt differ before the marker and their anchor hidden states are
not identical by construction: that is what the alignment term has to pull together.
"""

from __future__ import annotations

import random
import re

MARKER = "Answer:"
_RESULT = re.compile(r"\s*(\d+)\s*")


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}=?"


def place_values(n: int) -> list[int]:
    """The non-zero place values of ``n``, highest first: ``408 -> [400, 8]``."""
    digits = str(n)
    width = len(digits)
    return [int(d) * 10 ** (width - 1 - i) for i, d in enumerate(digits) if d != "0"]


def worked_trace(a: int, b: int, variant: int = 0) -> str:
    """A correct response (without the end-of-sequence token). ``variant`` in ``[0, 4)``:
    bit 0 splits ``a`` instead of ``b``, bit 1 adds the lowest place first."""
    base, split = (b, a) if variant & 1 else (a, b)
    parts = place_values(split)
    if variant & 2:
        parts = parts[::-1]
    steps, total = [], base
    for p in parts:
        steps.append(f"{total}+{p}={total + p}")
        total += p
    return " " + " ".join(steps) + f" {MARKER} {a + b}"


def verify(response: str, answer: int) -> bool:
    """The verifiable reward: the text after the last answer marker is exactly the result.

    Only the final answer counts (a wrong intermediate step with a right result still passes),
    as with DAPO's math verifier."""
    head, sep, tail = response.rpartition(MARKER)
    if not sep:
        return False
    match = _RESULT.fullmatch(tail)
    return match is not None and int(match.group(1)) == answer


class Problems:
    """Operand pairs with ``digits`` digits each; a held-out set disjoint from training draws."""

    def __init__(self, digits: int, eval_size: int, seed: int):
        if digits < 1:
            raise ValueError("digits must be >= 1")
        self.low, self.high = 10 ** (digits - 1), 10**digits - 1
        span = self.high - self.low + 1
        if eval_size > span * span // 2:
            raise ValueError(f"eval_size {eval_size} is too large for {digits}-digit operands")
        # The held-out pairs come from their own stream so they do not depend on the run length.
        held = random.Random(f"held-out/{digits}/{seed}")
        self.held_out: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        while len(self.held_out) < eval_size:
            pair = self._draw(held)
            if pair not in seen:
                seen.add(pair)
                self.held_out.append(pair)
        self._held = seen

    def _draw(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(self.low, self.high), rng.randint(self.low, self.high)

    def train(self, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """``n`` training pairs, never a held-out one."""
        out = []
        while len(out) < n:
            pair = self._draw(rng)
            if pair not in self._held:
                out.append(pair)
        return out
