"""Side by side with TRL (benchmarks/bench_vs_trl.py): inputs, the convention mapping, workers."""
