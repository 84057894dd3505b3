"""Test helpers (not tests): launching ranks, the independent HF reference, layout checks."""
