"""Typed configs: YAML recipes, dotted overrides, errors that name the key; the shipped recipes."""


import pytest

from solopo_mcore.config import ConfigError, RECIPES_DIR, load_config
from solopo_mcore.models.hf_config import shape_from_dict
from solopo_mcore.models.reference_configs import BY_NAME
from solopo_mcore.models.layout_fit import check_model_fits_layout
from solopo_mcore.parallel.layout import validate_layout


def test_overrides_are_typed_and_applied():
    cfg = load_config("tiny_cpu", ["objective.alpha=3", "optimizer.lr=1e-3",
                                   "parallel.tensor_model_parallel_size=1",
                                   "checkpoint.save_dir=null"])
    assert cfg.objective.alpha == 3.0 and isinstance(cfg.objective.alpha, float)
    assert cfg.optimizer.lr == 1e-3 and cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.checkpoint.save_dir is None and cfg.training.train_steps == 30


@pytest.mark.parametrize("override,message", [
    ("objective.alpah=1", "unknown config key 'objective.alpah'"),
    ("optimiser.lr=1", "unknown config key 'optimiser'"),
    ("data.micro_batch_size=two", "data.micro_batch_size: expected an integer"),
    ("objective.algorithm=ppo", "objective.algorithm: 'ppo' is not one of dpo, simpo, orpo"),
    ("objective.label_smoothing=0.7", "objective.label_smoothing: must be in [0, 0.5)"),
    ("training.deterministic=maybe", "training.deterministic: expected true/false"),
    ("objective.alpha", "expected key.sub=value"),
    ("optimizer.optimizer_cpu_offload=true", "needs parallel.use_distributed_optimizer"),
    ("model.layer_spec=te", "Set data.shared_prefix=false to use model.layer_spec=te"),
])
def test_bad_values_name_the_key(override, message):
    extra = ["parallel.use_distributed_optimizer=false"] if "offload" in override else []
    with pytest.raises(ConfigError) as err:
        load_config("tiny_cpu", extra + [override])
    assert message in str(err.value)


def test_shared_prefix_is_the_default_and_te_loads_without_it():
    assert load_config("tiny_cpu").data.shared_prefix is True
    cfg = load_config("tiny_cpu", ["model.layer_spec=te", "data.shared_prefix=false"])
    assert cfg.model.layer_spec == "te" and cfg.data.shared_prefix is False


def test_dpo_without_reference_is_refused_before_start():
    with pytest.raises(ConfigError, match="needs data.ref_logprobs_path"):
        load_config("tiny_cpu", ["objective.algorithm=dpo", "data.data_path=/x"])


def test_unknown_recipe_lists_the_named_ones():
    with pytest.raises(ConfigError, match="qwen2.5-7b_solo-orpo_8gpu"):
        load_config("no-such-recipe")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")
                                          if not p.stem.startswith(("tiny_cpu", "smollm2"))))
def test_paper_recipes_load_and_fit_their_cluster(recipe):
    cfg = load_config(recipe)
    model = "qwen2.5-7b" if recipe.startswith("qwen") else "llama3.1-8b"
    world = 32 if "4node" in recipe else 8
    check_model_fits_layout(shape_from_dict(BY_NAME[model]), cfg.parallel)
    dp = validate_layout(cfg.parallel, world)
    assert cfg.data.global_batch_size % (cfg.data.micro_batch_size * dp) == 0
    expected_alpha = {"solo-orpo": 4.0 if model == "llama3.1-8b" else 1.0, "solo-simpo": 1.0,
                      "solo-dpo": 3.0}
    algo = next(k for k in expected_alpha if k in recipe)
    assert cfg.objective.alpha == expected_alpha[algo]  # the paper's alpha
    assert cfg.model.params_dtype == "bf16" and cfg.objective.mode == "solo"


@pytest.mark.parametrize("overrides,message", [
    (["checkpoint.hf_init_dir={d}/hf", "checkpoint.export_hf_dir={d}/hf"],
     "checkpoint.export_hf_dir {d}/hf is the same path as checkpoint.hf_init_dir"),
    (["checkpoint.hf_init_dir={d}/hf", "checkpoint.export_hf_dir={d}/hf/../hf/"],
     "is the same path as checkpoint.hf_init_dir"),
    (["checkpoint.load_dir={d}/ck", "checkpoint.save_dir={d}/ck/new"],
     "checkpoint.save_dir {d}/ck/new lies inside checkpoint.load_dir"),
    (["data.data_path={d}/data/qa", "checkpoint.export_hf_dir={d}/data"],
     r"checkpoint.export_hf_dir {d}/data contains data.data_path \(.bin\)"),
    (["model.hf_config_path={d}/hf", "logging.tensorboard_dir={d}"],
     "logging.tensorboard_dir {d} contains model.hf_config_path"),
    (["data.ref_logprobs_path={d}/ref.npy", "logging.metrics_path={d}/ref.json"],
     r"logging.metrics_path {d}/ref.json is the same path as data.ref_logprobs_path \(.json\)"),
])
def test_no_output_is_contains_or_lies_inside_an_input(overrides, message, tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match=message.format(d=tmp_path) + ".*Point each output"):
        load_config("tiny_cpu", [o.format(d=tmp_path) for o in overrides])


def test_load_dir_equal_to_save_dir_is_megatrons_resume_idiom(tmp_path):
    cfg = load_config("tiny_cpu", [f"checkpoint.load_dir={tmp_path}/ck",
                                   f"checkpoint.save_dir={tmp_path}/ck/."])
    assert cfg.checkpoint.load_dir


# ------------------------------------------------ consistency, before any process group or model

@pytest.mark.parametrize("overrides,message", [
    (["optimizer.lr=1e-5", "optimizer.min_lr=1e-4"],
     r"optimizer.min_lr=0.0001 is above optimizer.lr=1e-05.*set min_lr <= lr"),
    (["optimizer.min_lr=-1e-6"], r"optimizer.min_lr: must be >= 0"),
    (["optimizer.lr=-1e-6"], r"optimizer.lr: must be >= 0"),
])
def test_learning_rates_are_checked_on_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny_cpu", overrides)


def _dataset_and_model(tmp_path, num_examples=10, data_vocab=600, model_vocab=629):
    import json
    prefix = tmp_path / "data" / "qa"
    prefix.parent.mkdir(parents=True)
    for ext in (".bin", ".idx"):
        prefix.with_name("qa" + ext).write_bytes(b"")
    prefix.with_name("qa.meta.json").write_text(json.dumps(
        {"num_examples": num_examples, "vocab_size": data_vocab, "tokenizer": "builtin:x"}))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"vocab_size": model_vocab}))
    return [f"data.data_path={prefix}", f"model.hf_config_path={tmp_path / 'model'}",
            "checkpoint.save_dir=null", "data.num_eval_examples=2"]


@pytest.mark.parametrize("case,overrides,message", [
    ("eval", ["data.num_eval_examples=10"],
     r"data.num_eval_examples=10 leaves no training examples: .* has 10; hold out fewer"),
    ("batch", ["data.num_eval_examples=4", "data.global_batch_size=8"],
     r"6 training examples \(10 in .* minus data.num_eval_examples=4\) are fewer than "
     r"data.global_batch_size=8"),
    ("vocab", [], r"tokenized with builtin:x \(700 tokens\), more than the model's vocab_size "
                  r"629 .*--tokenizer MODEL_DIR --model-config MODEL_DIR.*model.hf_config_path"),
    ("no config.json", ["model.hf_config_path={tmp}/nowhere"],
     r"model.hf_config_path=.*/nowhere: no config.json there"),
])
def test_dataset_header_is_checked_against_config_and_model(case, overrides, message, tmp_path):
    from solopo_mcore.config import require_training_data
    base = _dataset_and_model(tmp_path, data_vocab=700 if case == "vocab" else 600)
    cfg = load_config("tiny_cpu", base + [o.format(tmp=tmp_path) for o in overrides])
    with pytest.raises(ConfigError, match=message):
        require_training_data(cfg)
    require_training_data(load_config("tiny_cpu", _dataset_and_model(tmp_path / "fine")))


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.tensor_model_parallel_size=2"],
     r"3 processes were launched, not a multiple of TP x PP x CP = 2 x 1 x 1 = 2"),
    (4, ["parallel.tensor_model_parallel_size=1", "data.global_batch_size=6",
         "data.micro_batch_size=1"],
     r"data.global_batch_size=6 is not divisible by data.micro_batch_size x data-parallel "
     r"size = 1 x 4 .*a multiple of 4"),
])
def test_launch_size_is_checked_before_any_process_group(world, overrides, message):
    from solopo_mcore.config import check_launch
    with pytest.raises(ConfigError, match=message):
        check_launch(load_config("tiny_cpu", overrides), world)
    assert check_launch(load_config("tiny_cpu", ["parallel.tensor_model_parallel_size=1"]), 2) == 2


def test_the_pretrained_cpu_recipe_fits_smollm2_and_a_from_scratch_lr_is_warned_of():
    from solopo_mcore.training.build import from_scratch_lr_warning

    cfg = load_config("smollm2-135m_cpu", ["checkpoint.hf_init_dir=/models/smollm2"])
    check_model_fits_layout(shape_from_dict(BY_NAME["smollm2-135m"]), cfg.parallel)
    assert validate_layout(cfg.parallel, 2) == 2  # DP 2 on the 2-core machine
    assert cfg.model.params_dtype == "fp32" and cfg.objective.alpha == 1.0
    assert from_scratch_lr_warning(cfg) is None
    demo = load_config("tiny_cpu_qa", ["checkpoint.hf_init_dir=/models/smollm2"])
    warning = from_scratch_lr_warning(demo)
    assert warning.startswith("optimizer.lr=0.003 with pretrained weights (/models/smollm2)")
    assert "smollm2-135m_cpu recipe: 2e-5" in warning
    with pytest.raises(Exception, match="does not divide num_attention_heads=9"):
        check_model_fits_layout(shape_from_dict(BY_NAME["smollm2-135m"]),
                                load_config("smollm2-135m_cpu",
                                            ["parallel.tensor_model_parallel_size=2"]).parallel)


def test_the_pretrained_demo_settings_make_a_valid_run_of_its_recipe():
    """examples/demo_cpu.py --model smollm2-135m: its overrides on its recipe validate, keep a
    pretrained-weights rate, and evaluate at the start, middle and end of the run."""
    from solopo_mcore.evaluation.pretrained_demo import DEMO
    from solopo_mcore.training.build import from_scratch_lr_warning

    cfg = load_config(DEMO.recipe, [*DEMO.training_overrides(),
                                    "checkpoint.hf_init_dir=/models/smollm2"])
    assert cfg.training.train_steps == DEMO.train_steps and cfg.optimizer.lr == DEMO.lr
    assert cfg.data.num_eval_examples == DEMO.num_eval_examples < DEMO.num_examples
    assert DEMO.train_steps % cfg.training.eval_interval == 0
    assert from_scratch_lr_warning(cfg) is None
    assert validate_layout(cfg.parallel, 2) == 2
