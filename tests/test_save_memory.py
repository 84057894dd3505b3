"""A checkpoint save in bounded host memory (issue 36, item 4): the optimizer's state is handed to
the writer one parameter at a time and written one tensor at a time, and the files are the same
as megatron-core's own save writes (solopo_mcore/storage/optimizer_state.py, writer.py)."""

from __future__ import annotations

import pytest

from tests.helpers.dist import run_distributed

LAYOUTS = [pytest.param(2, dict(tp=2), id="tp2"), pytest.param(2, dict(pp=2), id="pp2"),
           # DP4 (not DP2): four ranks split parameters where the owner's own part is not the
           # first, as well as where it is (a planted offset bug passed at DP2)
           pytest.param(4, dict(), id="dp4")]


@pytest.mark.parametrize("world,layout", LAYOUTS)
def test_save_equals_megatrons_and_copies_only_split_parameters(tiny_qwen2, tmp_path, world,
                                                                layout):
    out = run_distributed(world, "tests.helpers.save_checks:check_save_equals_megatrons",
                          hf_dir=tiny_qwen2, root=str(tmp_path), **layout)
    first = out[0]
    # the same files, tensor for tensor: model, main parameters and both Adam moments
    assert first["only_in_one"] == [] and first["different"] == [], first
    num_model_tensors = first["num_tensors"] - first["num_optimizer_tensors"]
    assert first["num_optimizer_tensors"] == 3 * num_model_tensors >= 27, first
    assert first["zero_moments"] == [], first
    for rank in out:
        # megatron's gather copies the whole state (3 fp32 tensors per parameter) on every rank
        assert rank["copied_megatron"] >= 3 * rank["model_bytes"], rank
        if layout:  # one rank per DP group: each rank's own state, viewed, never copied
            assert rank["copied_ours"] == 0, rank
        else:  # DP: only the parameters split between ranks are assembled
            assert rank["split_params"] >= 1, rank
    if not layout:  # at most the split parameters' state, once, on their owners
        assert sum(r["copied_ours"] for r in out) <= 3 * out[0]["model_bytes"] // 2, out
