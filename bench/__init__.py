"""Benchmarks and the prepared GPU check: scripts, outside the ``emit_jax`` package (which never
imports them), run from the repository root as ``python -m bench {heatmap,rollout,grpo_step,
train_step,matmul,gpu,compare} ...`` (``python -m bench --help``).

- ``bench/__main__.py``: the command line;
- ``bench/heatmap.py``: the CE heat map at an architecture's shape;
- ``bench/steps.py``: the matmul peak, the sampler, a GRPO step and an SFT step (MFU, profile);
- ``bench/compare.py``: ours against the peers' scripts of ``../shared/bench``, alternately;
- ``bench/gpucheck.py``: the prepared accelerator check (``python -m bench gpu``);
- ``bench/torch_heatmap.py``: the peers' PyTorch heat map at our shape (``python
  bench/torch_heatmap.py``; the one script here that imports torch).

This file imports nothing, so ``bench/torch_heatmap.py`` can take the heat-map shape from
``bench.heatmap`` without loading the other benchmarks.
"""
