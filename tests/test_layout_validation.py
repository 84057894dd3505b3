"""Invalid layouts fail at start-up with a message that says what to change."""

import pytest

from solopo_mcore.config import ParallelConfig
from solopo_mcore.models.hf_config import read_hf_config
from solopo_mcore.models.layout_fit import check_model_fits_layout
from solopo_mcore.parallel.layout import LayoutError, validate_layout


@pytest.fixture()
def shape(tiny_qwen2):
    return read_hf_config(tiny_qwen2)  # 4 heads, 2 KV groups, 4 layers


def test_valid_layout_returns_data_parallel_size(shape):
    check_model_fits_layout(shape, ParallelConfig(tensor_model_parallel_size=2))
    assert validate_layout(ParallelConfig(tensor_model_parallel_size=2), 8) == 4


def test_tp_not_dividing_heads(shape):
    with pytest.raises(LayoutError, match="does not divide num_attention_heads=4"):
        check_model_fits_layout(shape, ParallelConfig(tensor_model_parallel_size=3))


def test_tp_not_dividing_kv_groups(shape):
    with pytest.raises(LayoutError, match="2 KV groups.*e.g. 2"):
        check_model_fits_layout(shape, ParallelConfig(tensor_model_parallel_size=4))


def test_layers_not_divisible_by_pp(shape):
    with pytest.raises(LayoutError, match="num_layers=4 is not divisible by .* 3 x 1"):
        check_model_fits_layout(shape, ParallelConfig(pipeline_model_parallel_size=3))


def test_world_size_does_not_factor():
    with pytest.raises(LayoutError, match="world size 6 is not divisible by TP x PP x CP"):
        validate_layout(ParallelConfig(tensor_model_parallel_size=2, context_parallel_size=2), 6)


def test_sequence_parallel_defaults_on_with_tp_and_can_be_switched_off():
    from solopo_mcore.config import load_config
    assert not ParallelConfig().sequence_parallel_enabled
    assert ParallelConfig(tensor_model_parallel_size=2).sequence_parallel_enabled
    assert not ParallelConfig(tensor_model_parallel_size=2,
                              sequence_parallel=False).sequence_parallel_enabled
    off = load_config(None, ["parallel.tensor_model_parallel_size=2",
                             "parallel.sequence_parallel=false"])
    assert off.parallel.sequence_parallel is False and not off.parallel.sequence_parallel_enabled


@pytest.mark.parametrize("tp,cp", [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (2, 3), (8, 4)])
@pytest.mark.parametrize("sequence_parallel", [None, False])
def test_padded_segments_split_evenly_over_cp_then_tp(tp, cp, sequence_parallel):
    """Whatever the segment lengths, the padded microbatch splits into 2*CP equal zigzag chunks per
    segment, and each CP rank's part splits evenly over the TP ranks when SP is on."""
    import random

    from solopo_mcore.data.packing import round_up
    from solopo_mcore.parallel.layout import sequence_pad_multiple
    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp,
                              sequence_parallel=sequence_parallel)
    multiple = sequence_pad_multiple(parallel)
    rng = random.Random(tp * 10 + cp)
    for _ in range(20):
        padded = [round_up(rng.randint(1, 300), multiple) for _ in range(rng.randint(1, 5))]
        if cp > 1:
            assert all(n % (2 * cp) == 0 for n in padded)
        if parallel.sequence_parallel_enabled:
            assert sum(n // cp for n in padded) % tp == 0
    assert multiple <= 2 * cp * tp  # no more padding than a plain product would add


def test_interleaved_pipeline_refuses_steps_that_are_all_warm_up():
    """Our refusal rule equals megatron-core's own count: the first stage runs every microbatch in
    warm-up (the case that deadlocked, PP2 x VPP2 with 2 microbatches on gloo) exactly when
    :func:`check_interleaved_microbatches` refuses; the message names the keys to change."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from solopo_mcore.parallel.layout import check_interleaved_microbatches

    for pp in (2, 3, 4):
        for vpp in (2, 3):
            for num_microbatches in range(pp, 6 * pp + 1, pp):
                group = SimpleNamespace(size=lambda pp=pp: pp, rank=lambda: 0)
                communicator = SimpleNamespace(pp_group=group,
                                               virtual_pipeline_model_parallel_size=vpp)
                _, all_warmup, _, _ = get_pp_rank_microbatches(
                    num_microbatches, vpp, pp, p2p_communicator=communicator)
                try:
                    check_interleaved_microbatches(pp, vpp, num_microbatches)
                    refused = False
                except LayoutError as err:
                    refused = True
                    assert "data.global_batch_size" in str(err)
                    assert "data.micro_batch_size" in str(err)
                assert refused == all_warmup, (pp, vpp, num_microbatches)
    with pytest.raises(LayoutError, match="needs at least 4 microbatches per step, this step "
                                          "has 2"):
        check_interleaved_microbatches(2, 2, 2)
    check_interleaved_microbatches(2, 1, 1)  # no virtual pipeline: nothing to refuse
