"""The pretrained CPU demo's settings and targets (``examples/demo_cpu.py --model smollm2-135m``).

SmolLM2-135M-Instruct answers the varied-relations task from its short context and mostly fails
on the long one: it copies passages instead of answering. SoLo-ORPO trains on the short context
and pulls the chosen answer's long-context reward towards its short-context one. Why these
settings: docs/data.md, "The pretrained demo".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from solopo_mcore.evaluation.learning import fmt_interval


@dataclass(frozen=True)
class PretrainedDemo:
    model: str = "smollm2-135m"
    """The pinned model (``solopo_mcore/convert/pretrained.py``)."""
    recipe: str = "smollm2-135m_cpu"
    """Training recipe; the overrides below are applied on top."""
    num_examples: int = 256
    """QA rows generated; ``num_eval_examples`` of them are held out."""
    num_eval_examples: int = 48
    """Held-out examples: pairwise accuracy during training and answer accuracy before/after."""
    long_tokens: int = 512
    """Long-context length in the model's tokens (1,024 costs twice the time: docs/data.md)."""
    num_distractors: int = 8
    """Distractor facts per long context (Wikipedia paragraphs fill the rest)."""
    num_same_relation: int = 4
    """Of those, how many state the question's relation about other people."""
    rule_style: str = "sentence"
    """``sample_pairs --rule-style``: chosen = the evidence sentence, rejected = a same-relation
    distractor's sentence from the long context (``quote`` adds an ``Answer: NAME`` line, which
    made the trained model's answers depend on the example order: docs/data.md)."""
    instruction: str = "final-answer"
    """``build_triplets --instruction``. ``sentence`` (answer with the one sentence that answers)
    matches the chosen answers' form but measured worse: the trained model then often quoted
    the chat template's system sentence (docs/data.md, run H)."""
    train_steps: int = 24
    """Optimizer steps (4 examples each)."""
    lr: float = 5e-5
    """Peak learning rate (2 warm-up steps, cosine to ``min_lr``)."""
    min_lr: float = 1e-5
    """Final learning rate."""
    max_new_tokens: int = 32
    """Greedy answer budget: a chosen sentence is 8-16 tokens."""
    grid_lengths: tuple = (256, 512, 1024)
    """Depth x length heatmap: user-message lengths in tokens."""
    grid_depths: tuple = (0, 50, 100)
    """Depth x length heatmap: evidence depths in percent."""
    grid_limit: int = 8
    """Held-out examples per heatmap cell (the grid is 6 of the demo's 22 minutes; 6 a cell
    saved only 45 s of it, measured)."""
    overrides: tuple = field(default=())
    """Extra recipe overrides."""

    def grid_arguments(self) -> list[str]:
        """``evaluate_qa.py`` arguments for the depth x length heatmap."""
        return ["--grid", "--lengths", ",".join(map(str, self.grid_lengths)), "--depths",
                ",".join(map(str, self.grid_depths)), "--limit", str(self.grid_limit)]

    def training_overrides(self) -> list[str]:
        return [f"training.train_steps={self.train_steps}", f"optimizer.lr={self.lr}",
                f"optimizer.min_lr={self.min_lr}", "optimizer.lr_warmup_steps=2",
                f"data.num_eval_examples={self.num_eval_examples}",
                f"training.eval_interval={self.train_steps}",  # step 0 and the end: ~90 s each
                f"checkpoint.save_interval={self.train_steps}", *self.overrides]


DEMO = PretrainedDemo()

#: What the pretrained demo is for: long-context answers improve, short ones stay.
TARGETS = {"long_gain": 0.2, "short_floor": 0.85}


def targets_statement(report: dict) -> str:
    """One line per target, measured, saying met or not met."""
    before, after = report["answer"]["before"], report["answer"]["after"]
    gain = after["long"]["value"] - before["long"]["value"]
    disjoint = after["long"]["ci95"][0] > before["long"]["ci95"][1]
    long_met = gain >= TARGETS["long_gain"] and disjoint
    short_met = after["short"]["value"] >= TARGETS["short_floor"]
    return "\n".join([
        f"Target: long-context answer accuracy up by >= {TARGETS['long_gain']} with disjoint 95% "
        f"intervals: {fmt_interval(before['long']['value'], *before['long']['ci95'])} -> "
        f"{fmt_interval(after['long']['value'], *after['long']['ci95'])}, {gain:+.2f} "
        f"({'intervals disjoint' if disjoint else 'intervals overlap'}): "
        f"{'met' if long_met else 'NOT met'}.",
        f"Target: short-context answer accuracy stays >= {TARGETS['short_floor']}: "
        f"{fmt_interval(after['short']['value'], *after['short']['ci95'])}: "
        f"{'met' if short_met else 'NOT met'}."])
