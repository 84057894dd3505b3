"""Invalid layouts fail at start-up with a message that says what to change."""

import pytest

from solopo_mcore.config import ParallelConfig
from solopo_mcore.models.hf_config import read_hf_config
from solopo_mcore.parallel.layout import LayoutError, validate_layout


@pytest.fixture()
def shape(tiny_qwen2):
    return read_hf_config(tiny_qwen2)  # 4 heads, 2 KV groups, 4 layers


def test_valid_layout_returns_data_parallel_size(shape):
    assert validate_layout(shape, ParallelConfig(tensor_model_parallel_size=2), 8) == 4


def test_tp_not_dividing_heads(shape):
    with pytest.raises(LayoutError, match="does not divide num_attention_heads=4"):
        validate_layout(shape, ParallelConfig(tensor_model_parallel_size=3), 3)


def test_tp_not_dividing_kv_groups(shape):
    with pytest.raises(LayoutError, match="2 KV groups.*e.g. 2"):
        validate_layout(shape, ParallelConfig(tensor_model_parallel_size=4), 4)


def test_layers_not_divisible_by_pp(shape):
    with pytest.raises(LayoutError, match="num_layers=4 is not divisible by .* 3 x 1"):
        validate_layout(shape, ParallelConfig(pipeline_model_parallel_size=3), 3)


def test_world_size_does_not_factor(shape):
    with pytest.raises(LayoutError, match="world size 6 is not divisible by TP x PP x CP"):
        validate_layout(shape, ParallelConfig(tensor_model_parallel_size=2,
                                              context_parallel_size=2), 6)
