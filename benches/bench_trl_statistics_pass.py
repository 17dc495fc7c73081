"""What ``HiddenAlignGRPOTrainer``'s statistics pass costs where TRL runs no no-grad pass of its
own (``gradient_accumulation_steps == steps_per_generation``, no vLLM importance sampling), in
one run on the CPU: TRL's optimiser step with plain ``GRPOTrainer``, with the term over each
micro-step's rows (``align_scope="micro_batch"``) and with the generation batch's loss
(``align_scope="batch"``, the default), and the time of the pass itself.

A Qwen2-shaped model built from its config (hidden 256, 4 layers, vocabulary 32k), 32 rows
per generation batch in 2 micro-steps, completions of about 100 tokens written by a
``rollout_func`` (so that generation, usually the largest part of a step, is left out: the
ratios below are upper bounds of the share of a real step).

Usage: python benches/bench_trl_statistics_pass.py [--steps 11]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import write_table  # noqa: E402
from trl_ranks import (  # noqa: E402
    ANSWERS,
    GROUP,
    PROMPTS,
    TEMPLATES,
    answered,
    build_tokenizer,
    make_model,
)

FILLER = 90  # tokens of working before the answer


# A Qwen2 of the shape of a small model: the LM head and the layers in proportion.
SIZES = {
    "vocab_size": 32000,
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}


def run(cls, steps: int, **align) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    tokenizer = build_tokenizer()
    times = {"step": [], "pass": []}

    def rollout(prompts, trainer):
        prompt_ids, completion_ids = [], []
        for row, prompt in enumerate(prompts):
            answer = ANSWERS[PROMPTS.index(prompt)]
            text = "x " * (FILLER + row % 7) + TEMPLATES[row % GROUP].format(
                a=answer, w=int(answer) + 1
            )
            prompt_ids.append(tokenizer(prompt)["input_ids"])
            completion_ids.append(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        logprobs = [[0.0] * len(ids) for ids in completion_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    class Clock(TrainerCallback):
        def on_step_begin(self, *_args, **_kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, *_args, **_kwargs):
            times["step"].append(time.perf_counter() - self.start)

    class Timed(cls):
        def _align_own_pass(self):
            start = time.perf_counter()
            try:
                return super()._align_own_pass()
            finally:
                times["pass"].append(time.perf_counter() - start)

    config = GRPOConfig(
        output_dir="/tmp/bench_trl_statistics_pass",
        use_cpu=True,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        num_generations=GROUP,
        max_completion_length=128,
        max_steps=steps,
        report_to="none",
        save_strategy="no",
        logging_steps=steps,
        learning_rate=1e-5,
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    data = Dataset.from_dict({"prompt": PROMPTS * 4, "answer": ANSWERS * 4})
    trainer = (Timed if align else cls)(
        model=make_model(tokenizer, **SIZES),
        reward_funcs=[answered],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        rollout_func=rollout,
        callbacks=[Clock()],
        **align,
    )
    trainer.train()
    # The first step warms up allocator and kernels; medians of the rest.
    return {
        key: statistics.median(values[1:]) if values[1:] else None for key, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=11)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    from trl import GRPOTrainer

    from hidden_align.integrations.trl import HiddenAlignGRPOTrainer

    align = {"align_coef": 0.1, "align_markers": "Answer:"}
    plain = run(GRPOTrainer, args.steps)
    micro = run(HiddenAlignGRPOTrainer, args.steps, align_scope="micro_batch", **align)
    batch = run(HiddenAlignGRPOTrainer, args.steps, align_scope="batch", **align)
    rows = [
        ("GRPOTrainer", f"{plain['step'] * 1e3:.0f}", "1.00", "-"),
        (
            'align_scope="micro_batch"',
            f"{micro['step'] * 1e3:.0f}",
            f"{micro['step'] / plain['step']:.2f}",
            "-",
        ),
        (
            'align_scope="batch" (own pass)',
            f"{batch['step'] * 1e3:.0f}",
            f"{batch['step'] / plain['step']:.2f}",
            f"{batch['pass'] * 1e3:.0f} ({batch['pass'] / batch['step']:.0%} of the step)",
        ),
    ]
    print(
        write_table(
            "trl-statistics-pass",
            "TRL optimiser step (32 rows, 2 micro-steps, no generation), medians of "
            f"{args.steps - 1} steps, {torch.get_num_threads()} threads",
            ("trainer", "step ms", "vs GRPOTrainer", "statistics pass ms"),
            rows,
        )
    )


if __name__ == "__main__":
    main()
