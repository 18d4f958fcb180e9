"""The bounds every setting and flag is checked against, in one place: the command-line types
(``emit_jax.cli``), the training config (``emit_jax.training.config``) and the memory plan
(``emit_jax.plan``) all read them from here."""

#: the largest whole number a setting or flag may take, and the largest product of settings
#: (completions per step, optimiser updates): JAX's int32. A step count, a length, a seed or a
#: batch beyond it overflows in jitted code or optax, a traceback minutes into a run.
INT_MAX = 2**31 - 1
#: the most image tiles per image (``--max-tiles``, ``data.max_tiles``; InternVL uses up to
#: 12): the candidate grids grow with its cube, a hang beyond a few hundred
MAX_TILES = 40
#: the most tokens of a prompt or a generation (``--prompt_len``, ``--max-new-tokens``,
#: ``data.length_buckets``, ``grpo.max_new_tokens``): far beyond any model's context
MAX_TOKENS = 1 << 20
#: the most timed repeats of a benchmark (``--repeats``, ``--rounds``)
MAX_REPEATS = 10_000
#: the most devices a mesh may span (``plan --mesh`` / ``--devices``): beyond any pod
MAX_DEVICES = 1 << 20
#: the longest side of an image a command resizes to (``data.build --adfm-frame``; Pillow's
#: decompression-bomb limit is about 9,500 x 9,500)
MAX_IMAGE_SIDE = 8192
#: the largest matrix side of ``python -m bench matmul`` (a 16 GiB float32 matrix)
MAX_MATRIX_SIDE = 1 << 16
#: the largest patch grid side of a heat-map benchmark (``bench heatmap --grid``,
#: ``experiments.heatmap_parts --grid``): 8,192-pixel images in 14-pixel patches are 585, and
#: ``--grid 100000`` compiled for 49 s before JAX's warning and an out-of-memory line
MAX_GRID = 1024
#: the largest batch (rows, prompts, G) a benchmark or experiment flag may ask for
#: (``bench rollout --batch``, ``experiments.pointer --batch``): 1e8 rows ran silently
#: towards memory exhaustion
MAX_BATCH = 1 << 16
#: the most decoder or ViT layers a benchmark flag may build (``bench compile_time
#: --vit-layers``, ``experiments.pointer --layers``): InternVL3-8B has 28 and 24
MAX_LAYERS = 1024
#: the largest reward weight (``grpo.reward_weights``): the weighted sum stays finite
MAX_REWARD_WEIGHT = 1e6
