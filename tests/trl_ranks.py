"""``HiddenAlignGRPOTrainer`` in TRL's own training loop, launched as users launch it on several
processes: ``torchrun --nproc_per_node 2 tests/trl_ranks.py OUT`` (accelerate then runs as
``MULTI_CPU`` over gloo), or ``python tests/trl_ranks.py OUT --per-device 16`` for the one-process
run over the same generation batches.

Completions come from a ``rollout_func`` (TRL's own hook for custom generation) that writes, for
each row of the global generation batch, a completion fixed by the row's global position: with
sampling, each process would draw its own random numbers and the two runs would train on
different completions. Everything else is TRL's: the sampler and its split over processes,
rewards gathered over processes, advantages, shuffling into micro-steps, DDP, the optimiser.

Written to OUT (one file per rank, ``rank{R}.pt``): the rows each process generated (global
position and prompt), the statistics of each generation batch, the parameters after the first
optimiser step (rank 0) and the log history. ``--fail-rank R`` makes rank R alone fail in the
statistics pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

PAIRS = [(a, a + 1) for a in range(8)]
PROMPTS = [f"What is {a}+{b}?" for a, b in PAIRS]
ANSWERS = [str(a + b) for a, b in PAIRS]
GROUP = 4
COEF = 0.5
# Completion j of each group: a correct answer in three different wordings and one wrong one,
# so that each group has three correct anchored completions whose anchor states differ.
TEMPLATES = ("x {a} Answer: {a}", "{a}+ Answer: {a}", "Answer: {a}", "x x Answer: {w}")


def build_tokenizer():
    """A small vocabulary (the corpus's characters and their merges, no byte alphabet): a
    random policy then writes digits often enough for a toy reward."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"What is {a}+{b}?\nx Answer: {a + b}" for a in range(10) for b in range(10)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=64, special_tokens=["<pad>", "<eos>", "<unk>"], show_progress=False
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(tokenizer, **sizes):
    """A randomly initialised Qwen2 causal LM, tiny unless ``sizes`` (``Qwen2Config`` fields)
    say otherwise; the same weights on every process."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
        **sizes,
    }
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    return Qwen2ForCausalLM(Qwen2Config(bos_token_id=None, **special, **config))


def answered(completions, answer, **kwargs):
    """1 when the text after the last 'Answer:' is the reference answer."""
    return [float(c.rsplit("Answer:", 1)[-1].strip() == a) for c, a in zip(completions, answer)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--per-device", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--per-generation", type=int, default=2)
    parser.add_argument("--scope", default="batch")
    parser.add_argument("--fail-rank", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from hidden_align.integrations.trl import HiddenAlignGRPOTrainer

    tokenizer = build_tokenizer()
    record = {"rows": [], "statistics": [], "sources": []}

    def rollout(prompts, trainer):
        start = trainer.accelerator.process_index * len(prompts)
        prompt_ids, completion_ids = [], []
        for i, prompt in enumerate(prompts):
            row = start + i
            answer = ANSWERS[PROMPTS.index(prompt)]
            text = TEMPLATES[row % GROUP].format(a=answer, w=int(answer) + 1)
            prompt_ids.append(tokenizer(prompt)["input_ids"])
            completion_ids.append(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
            record["rows"].append((trainer.state.global_step, row, prompt))
        logprobs = [[0.0] * len(ids) for ids in completion_ids]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    class Recorder(TrainerCallback):
        def on_step_end(self, _args, state, _control, model=None, **kwargs):
            if state.global_step == 1 and trainer.accelerator.is_main_process:
                unwrapped = trainer.accelerator.unwrap_model(trainer.model)
                record["params"] = {
                    name: p.detach().clone() for name, p in unwrapped.named_parameters()
                }

    class Trainer(HiddenAlignGRPOTrainer):
        def _align_anchors(self, token_ids, in_completion):
            # One rank meets an error in the statistics pass, the other does not.
            if not torch.is_grad_enabled() and self.accelerator.process_index == args.fail_rank:
                raise ValueError(f"an error on rank {args.fail_rank} only")
            return super()._align_anchors(token_ids, in_completion)

        def _compute_loss(self, model, inputs):
            loss = super()._compute_loss(model, inputs)
            record["sources"].append(self.align_statistics_source)
            return loss

    def keep(stats):
        fields = ("group_ids", "unit_sum", "raw_sum", "count")
        record["statistics"].append({name: getattr(stats, name).clone() for name in fields})
        return stats

    # Every statistics pass of the trainer goes through this all-reduce.
    import hidden_align.integrations.trl as trl_module

    reduce = trl_module.reduce_over_processes
    trl_module.reduce_over_processes = lambda part, device: keep(reduce(part, device))

    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trainer"),
        use_cpu=True,
        per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=args.accumulation,
        steps_per_generation=args.per_generation,
        num_generations=GROUP,
        max_completion_length=12,
        max_steps=2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        learning_rate=1e-2,
        # Adam's first step scales each gradient element to about +-lr, which turns float32
        # rounding of a near-zero element into a visible difference; SGD keeps it rounding.
        optim="sgd",
        seed=0,
        bf16=False,
        disable_tqdm=True,
    )
    data = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS})
    trainer = Trainer(
        model=make_model(tokenizer),
        reward_funcs=[answered],
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        rollout_func=rollout,
        callbacks=[Recorder()],
        align_coef=COEF,
        align_markers="Answer:",
        align_scope=args.scope,
    )
    record["distributed_type"] = str(trainer.accelerator.distributed_type)
    record["num_processes"] = trainer.accelerator.num_processes
    trainer.train()
    record["log_history"] = trainer.state.log_history
    rank = trainer.accelerator.process_index
    torch.save(record, os.path.join(args.out, f"rank{rank}.pt"))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.exit(main())
