"""Long-context QA evaluation: short vs long accuracy on held-out triplets, and NIAH-style
depth x length grids built from held-out evidence (``examples/evaluate_qa.py``).

Modules: :mod:`.items` (evaluation items from triplets, the depth x length grid),
:mod:`.runner` (resumable greedy generation into ``results.jsonl``), :mod:`.summary` (sub-EM
scores, bootstrap intervals, ``summary.json`` / ``summary.md``), :mod:`.plots` (heatmap and
checkpoint comparison), :mod:`.models` (HF or Megatron checkpoints as generators).
"""
