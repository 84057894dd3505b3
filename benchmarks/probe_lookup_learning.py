"""How many training examples does a tiny transformer need to learn an in-context lookup?

The evidence behind the learnable task's CPU budget (docs/data.md, "The learnable task"). Plain
PyTorch + transformers (a Qwen2 of the demo's shape, trained from scratch with AdamW), no
trainer, one supervised token per example, fresh examples every step:

  copy    ``k1 v1 . k2 v2 . ... Q x ?`` -> ``A x``: repeat the question's entity. One attention
          layer at a fixed offset does it.
  lookup  ``k1 v1 . k2 v2 . ... Q x ?`` -> ``x v``: the value stated next to ``x`` in the
          context, i.e. the answer to "what is x's value?" among ``--facts`` key-value facts.
          It needs two attention layers composed (an induction circuit): the binding that the
          long context's hard distractors demand.

It prints held-out accuracy (64 examples) every ``--eval-every`` steps:

    python benchmarks/probe_lookup_learning.py --task lookup --facts 4 --steps 8000
"""

from __future__ import annotations

import argparse
import random
import time


def make_example(rng: random.Random, task: str, num_facts: int, num_names: int):
    names = rng.sample(range(num_names), 2 * num_facts)
    facts = [(names[2 * i], names[2 * i + 1]) for i in range(num_facts)]
    key, value = rng.choice(facts)
    context = [t for k, v in facts for t in (f"n{k}", f"n{v}", ".")] + ["Q", f"n{key}", "?"]
    response = ["A", f"n{key}"] if task == "copy" else [f"n{key}", f"n{value}"]
    return context, response


def main(argv=None) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["copy", "lookup"], default="lookup")
    parser.add_argument("--facts", type=int, default=4, help="key-value facts per context")
    parser.add_argument("--names", type=int, default=256, help="distinct entity tokens")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if min(args.eval_every, args.steps, args.batch_size, args.facts, args.threads) < 1:
        parser.error("--eval-every, --steps, --batch-size, --facts and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    vocab = {w: i for i, w in enumerate(["Q", "?", ".", "A"] +
                                        [f"n{i}" for i in range(args.names)])}
    rng = random.Random(0)

    def batch(examples):
        rows = [[vocab[w] for w in c + r] for c, r in examples]
        return torch.tensor(rows)  # all rows have the same length

    heldout = [make_example(rng, args.task, args.facts, args.names) for _ in range(64)]
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=args.hidden,
                         intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.0)
    start = time.time()
    print(f"probe: task={args.task} facts={args.facts} names={args.names} layers={args.layers} "
          f"hidden={args.hidden} batch={args.batch_size} lr={args.lr}")
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            model.eval()
            with torch.no_grad():
                x = batch(heldout)
                accuracy = (model(x).logits[:, -2].argmax(-1) == x[:, -1]).float().mean().item()
            model.train()
            print(f"step {step:6d}  examples {step * args.batch_size:7d}  held-out accuracy "
                  f"{accuracy:.2f}  ({time.time() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        x = batch([make_example(rng, args.task, args.facts, args.names)
                   for _ in range(args.batch_size)])
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 10)
        logits = model(x).logits[:, -2]
        loss = torch.nn.functional.cross_entropy(logits.float(), x[:, -1])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


if __name__ == "__main__":
    main()
