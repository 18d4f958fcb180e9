"""emit_jax: EMIT (difficulty-aware GRPO for industrial anomaly detection) in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="emit_jax",
    version="0.1.0",
    description=("JAX/Flax NNX reimplementation of EMIT: InternVL3 adapted to industrial anomaly "
                 "detection with contrastive heat-map tokens, a soft prompt and difficulty-aware GRPO"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["emit_jax", "emit_jax.*"]),
    # ops/heatmap_cpu.cc: the native heat-map kernel, compiled on first use (emit_jax/ops/native.py)
    package_data={"emit_jax": ["assets/*", "data/embedded_assets/*/*", "ops/*.cc"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "chex>=0.1.90",
        "ml_collections>=1.0",
        "numpy>=1.26",
        "scipy>=1.10",  # connected components and Hungarian matching (AD-FM boxes and rewards)
        "transformers>=5.0",
        "safetensors>=0.4",
        "grain>=0.2.12",
        "qwix>=0.1.5",
        "pillow>=10",
        "matplotlib>=3.7",
        "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
        "tqdm>=4.60",
        "tensorflow-datasets>=4.9.4",  # builders -> ArrayRecord, read without TensorFlow
        "importlib_resources",  # needed by tensorflow-datasets builders without TensorFlow
    ],
    extras_require={
        # torch is pinned: the CPU wheel is used for the parity tests; never a multi-GB CUDA build.
        # pytest-xdist: the suite runs on 2 workers (pytest.ini), one file per worker at a time
        # jax[tpu]: libtpu, so tests/test_aot.py compiles the tiny programs for a TPU slice (the
        # compiler runs on the CPU host; nothing needs a TPU)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0",
                 "jax[tpu]==0.10.2"],
        # python -m emit_jax.aot: the TPU compiler (libtpu 0.0.42.*, a 203 MiB wheel) for
        # compiling the programs for a TPU slice on a CPU host; pinned to the jax it pairs with
        "tpu-aot": ["jax[tpu]==0.10.2"],
    },
    entry_points={},
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: Apache Software License"],
)
