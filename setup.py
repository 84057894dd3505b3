"""solopo-mcore: the Megatron-Core trainer for SoLoPO (short-to-long preference optimization)."""

from setuptools import find_packages, setup

setup(
    name="solopo-mcore",
    version="0.1.0",
    description="Megatron-Core trainer for SoLoPO: short-to-long preference optimization",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["solopo_mcore", "solopo_mcore.*", "data_tools",
                                    "data_tools.*"]),
    package_data={"solopo_mcore": ["recipes/*.yaml"]},
    install_requires=[
        # torch is a range, never a pin: a user's CUDA build must not be replaced.
        "torch>=2.6",
        # The tested range (CI: 0.16.1 on Python 3.11, newest 0.19.x on 3.12). Raise the upper
        # bound only with a green CI leg on the new release.
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.45",
        "datasets>=2.19",
        "safetensors>=0.4",
        "tensorboard>=2.14",
        "nvidia-ml-py>=12.535",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.24",
        "tiktoken>=0.7",
        "matplotlib>=3.7",
    ],
    extras_require={
        # wandb: the W&B test reads offline runs back with `wandb leet inspect` (0.31+)
        "test": ["pytest>=8.0", "pytest-timeout>=2.3", "wandb>=0.31"],
        # examples/convert_checkpoint.py gguf-to-hf (transformers' GGUF loader needs both) and
        # the pretrained CPU demo (SmolLM2-135M ships as a GGUF); setup.sh installs it
        "gguf": ["gguf>=0.10.0", "accelerate>=0.26.0"],
        # Weights & Biases logging (logging.wandb_project, evaluate_qa.py --wandb-project)
        "wandb": ["wandb>=0.17"],
        # Optional accelerators, never required:
        #   transformer-engine[pytorch]  TE layer spec (only with model.layer_spec=te: not
        #                                validated here, see README), fused kernels, ring CP
        #   flash-attn                   faster attention kernels (via TE)
        #   apex                         fused norms / optimizers (build from source)
        "gpu": ["transformer-engine[pytorch]>=2.0", "flash-attn>=2.6"],
        # benchmarks/bench_vs_trl.py: TRL side by side. Pinned: benchmarks/vs_trl/conventions.py
        # maps our keys to this version's arguments (docs/trl.md), checked by the benchmark.
        "compare": ["trl==1.16.0"],
        # vLLM speeds up `python -m data_tools.sample_pairs` when installed.
        "sampling": ["vllm"],
    },
)
