"""Shared defaults of the embedded-default recipes (tiny model, 2-core CPU)."""

import ml_collections

from emit_jax.errors import ConfigError


def check_variant(arg, *known: str) -> None:
    """``get_config(arg)``'s ``arg`` must be None (the full recipe) or one of ``known``: a
    misspelt variant (``configs/grpo.py:smok``) used to run the full recipe instead."""
    if arg is not None and arg not in known:
        raise ConfigError(f"unknown variant {arg!r}; " + (
            f"this recipe has {', '.join(map(repr, known))} (or none: the full recipe)" if known
            else "this recipe takes none (name the file without ':...')"))


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.arch = "tiny"
    c.init_from = ""  # an HF folder or an emit_jax Orbax checkpoint; "" = random init of `arch`
    # with no init_from, where the ViT's weights come from (emit_jax.training.vision_init): ""
    # (random), "embedded" (the packaged label-free ViT of `tiny`), a .safetensors file or a
    # model folder
    c.vision_init = ""
    c.tokenizer = ""  # a tokenizer folder; "" = the tiny tokenizer trained into the workdir
    c.param_dtype = ""
    c.image_size = 0  # 0 = the architecture's
    c.seed = 0
    c.stages = ("base", "sft")
    c.data = ml_collections.ConfigDict(dict(
        source="embedded", seed=0, max_tiles=1, text_samples=True,
        dk_sentences=1,  # first sentence of each domain-knowledge entry: a length budget for tiny
        base_think=True,  # base stage: also templated <think> answers (GRPO's format reward)
        domain_knowledge=False,  # tiny: no domain-knowledge block (EMIT has one; 8B configs do)
        # anomaly discrimination's two options: "shuffled" (EMIT's builder) or "yes_no" (always
        # A. Yes. / B. No., as MMAD asks them; docs/training.md, "the option order")
        ad_order="shuffled",
        # templated think answers (base stage, warm-up, sft.think, sft2): "brief" (the object
        # and the defect, then the letter) or "restate" (the four-option tasks restate their
        # options word then letter, so the answer's letter is a copy; emit_jax.training.data)
        rationale="brief",
        # the four-option tasks' trained answers: "letter" (EMIT's), "words" (the option's own
        # words, which EMIT's parser maps to the closest option; emit_jax.training.data.in_words)
        # or "all_words" (anomaly discrimination's too: "Yes." / "No.", no bare letter trained)
        answers="letter",
        # not in EMIT: > 0 gives each defect-classification question a third image, the query
        # cropped to that share of its side around the heat map's maximum (cut once with the
        # ViT the run starts from; emit_jax.training.zoom); 0 = off
        zoom=0.0,
        zoom_layers=(),  # the ViT blocks of the map that places the crop; () = emit's CE layers
        # not in EMIT: True gives each defect-localization question a line naming the region of
        # that map's maximum ("Image-2 differs most from Image-1 at its top left.")
        peak_region=False,
        length_buckets=(512, 768, 1024, 1536, 2048, 4096)))
    # optional text-only warm-up stage (add "warmup" to stages): short text versions of the tasks,
    # the images replaced by a sentence at the end of the user turn. Measured 2026-11-22 (2-core
    # CPU, docs/training.md): 100 steps of batch 32 at lr 1e-3 on the AD records teach the
    # tiny LLM to answer AD from the sentence (held-out 100 %), but stage 1 does not learn to
    # reach that pathway from the heat map, so the default recipe leaves it out.
    c.warmup = ml_collections.ConfigDict(dict(steps=300, batch_size=32, lr=2e-3, warmup_ratio=0.05,
                                              weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0,
                                              micro_batch_size=0,
                                              tasks=(),  # () = all four tasks
                                              # the hint: "statement" (a sentence) or "map" (a
                                              # defect map in the contrastive tokens' place; AD
                                              # and DL only; warmup_map in emit_jax.training.data)
                                              hint="statement"))
    # the base-model stage: the whole tiny MLLM, all four tasks (direct + templated think answers)
    c.base = ml_collections.ConfigDict(dict(steps=150, batch_size=8, lr=2e-3, warmup_ratio=0.05,
                                            weight_decay=0.01, b1=0.9, b2=0.95, clip_norm=1.0,
                                            micro_batch_size=0,
                                            statements=False,  # mix the warm-up's records in
                                            train_vision=True,  # False: the ViT stays as built
                                            # N > 0: also questions on every image of N
                                            # further embedded datasets (seeds data.seed+1..+N)
                                            # for fresh_tasks (() = DC, DL and OC);
                                            # fresh_direct: the share of them asked with the
                                            # direct instruction instead (as the held-out ones)
                                            fresh_datasets=0, fresh_tasks=(), fresh_direct=0.0,
                                            # True: the base stage trains an EMIT model (the
                                            # contrastive tokens and soft prompt added before
                                            # it, not after; not EMIT's recipe), so the LLM
                                            # learns to read them on every task's questions
                                            emit=False))
    # EMIT stage 1: soft prompt + projector only (the paper's lr 1e-5 is for 8B; tiny needs more)
    c.sft = ml_collections.ConfigDict(dict(steps=60, batch_size=8, lr=1e-3, warmup_ratio=0.03,
                                           weight_decay=1e-4, b1=0.9, b2=0.95, clip_norm=1.0,
                                           # rows per micro-batch (gradient accumulation, the
                                           # same update in pieces); 0 = the whole batch at once
                                           micro_batch_size=0,
                                           tasks=(),  # () = all stage-1 tasks (AD + DL)
                                           # True: templated think answers (belief, then
                                           # letter) instead of the letter alone
                                           think=False,
                                           # N > 0: also the questions (fresh_tasks; () =
                                           # anomaly discrimination) of every image of N
                                           # further embedded datasets (seeds data.seed+1..+N;
                                           # with another data.source it is not used, and
                                           # the log says so)
                                           fresh_datasets=0, fresh_tasks=(),
                                           # () or one share in [0, 1] per fresh task: that
                                           # share of its questions is kept (drawn with seed)
                                           fresh_shares=(),
                                           # True: the language model is trained too (not
                                           # EMIT's stage 1), to learn to read the CE tokens;
                                           # its learning rate lr x llm_lr_scale (<= 1)
                                           train_llm=False, llm_lr_scale=1.0))
    c.emit = ml_collections.ConfigDict(dict(bn_mode="standard", use_soft_prompt=True,
                                            use_contrastive=True, num_soft_tokens=9,
                                            max_readout=False, peak_location=False,
                                            hot_patches=0,
                                            reference_turns=1, feature_turns=1,
                                            align_turn=False))
    # device mesh (emit_jax.parallel) when more than one device is present: the batch goes over
    # data x fsdp, parameters over fsdp (width) and tensor (heads / MLP / vocabulary); -1 = the rest
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    # emit_jax.models.memory: layer rematerialisation and query-chunked LLM attention (same
    # values; less memory, more compute). Off for tiny; the 8B configs turn both on.
    # vit_chunk: image tiles per ViT chunk (0 = all tiles at once)
    # remat_policy (with remat): what a layer keeps for the backward pass: "full" (its input
    # only), "minimal" (every weight matmul's output), "save_dot_except_mlp", "save_qkv_proj"
    c.memory = ml_collections.ConfigDict(dict(remat=False, attention_chunk=0, vit_chunk=0,
                                              remat_policy="full"))
    # emit_jax.models.kernels: the attention implementation ("einsum", "dot_product" = cuDNN flash
    # attention on a GPU, "splash" = Pallas on a TPU, "auto" = the platform's best) and how decode
    # steps read the KV cache ("full", or "bucketed": only the slots filled so far, rounded up to
    # decode_bucket new tokens doubling per phase). Same values either way.
    # scan_layers: the LLM's and the ViT's layers stacked and run by one lax.scan each
    # (emit_jax.models.scan; compile time independent of depth, same values and files)
    c.kernels = ml_collections.ConfigDict(dict(attention="einsum", decode="full", decode_bucket=64,
                                               scan_layers=False))
    c.checkpoint_every = 50
    # a rerun on a workdir whose stages were trained with other settings that their checkpoints
    # and models depend on (arch, init_from, vision_init, tokenizer, param_dtype, image_size; a
    # stage's trained set: warmup/base.train_vision, emit.* for sft, grpo.lora.rank/alpha/targets/
    # weight_qtype for sft2 and grpo; the stage before it in `stages`) stops with one error line
    # naming them (stored -> now). True: the first such stage and every later one of the run
    # start over, their old output moved to WORKDIR/replaced-<time>/ (not deleted). Other
    # settings (steps, lr, batch sizes, eval, logging, checkpoint_every...) may always change.
    # (emit_jax.training.stages.check_settings)
    c.restart = False
    # a step with a non-finite loss or gradient changes nothing and is counted; "skip" goes on
    # (stopping after 5 in a row), "stop" stops at the first with the last good state saved
    c.nonfinite = "skip"
    # JAX's persistent compilation cache ("" = off; $JAX_COMPILATION_CACHE_DIR wins): a resumed
    # or repeated run loads its compiled steps instead of compiling them again
    c.compile_cache = "~/.cache/emit_jax/xla"
    c.log_every = 10
    c.eval_limit = 200
    # N > 0: also evaluate every image of N embedded datasets no stage sees (seeds 1000..; only
    # with the embedded source): about 392 anomaly-discrimination questions each, where the test
    # split has 74 (emit_jax.training.data.unseen_records)
    c.eval_unseen = 0
    c.eval_unseen_limit = 0  # > 0: a fixed random subset of that many of those questions
    # the tasks asked on those images (() = all four)
    c.eval_unseen_tasks = ("anomaly_discrimination",)
    c.eval_think = True
    # how the held-out questions are asked: "direct" (MMAD's "Do not include any text in your
    # response.", the test split's records as built) or "think" (the think instruction, for a
    # recipe whose answers read the options in a think answer: data.rationale='restate');
    # eval_think only chooses how the answer is parsed
    c.eval_instruction = "direct"
    c.eval_max_new_tokens = 48
    # held-out questions per generation (emit_jax.evaluate.Runner.answer_batch), grouped by
    # shape: the same greedy answers as one at a time. 1 on a CPU, where a question's prefill
    # already fills the cores (8: 1.5x slower on the 2-core host, docs/training.md); more on
    # an accelerator, where one question's decode steps leave it idle
    c.eval_batch = 1
    c.export_hf = True
    return c


def embedded_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The embedded default's recipe (docs/training.md). The randomly initialised tiny
    LLM does not learn anomaly discrimination (AD) when its letter is the XOR of the belief and a
    shuffled option order, nor from 238 training images, nor, frozen, from a heat map whose
    signal sits in its maximum. So:

    - the AD options are always A. Yes. / B. No. (MMAD's order; EMIT shuffles them);
    - stage 1 adds the AD questions of twelve freshly drawn embedded datasets (4,704) and runs
      300 steps at lr 1e-2;
    - the base stage leaves the ViT as initialised (its heat map's maximum separates the classes
      with AUROC 0.81-0.88, a base-tuned ViT's 0.69-0.79);
    - ``emit.max_readout`` adds the map's maximum to every CE token (not in EMIT);
    - the ViT starts from the packaged label-free one (``vision_init='embedded'``: trained
      without labels on the stage-2 training split's images by ``vit_pretrain``, 600 steps; its
      map's maximum separates the classes with AUROC 0.89-0.90 where the random ViT's gives
      0.82-0.84), the rest of the model from random weights;
    - the four-option tasks (DC, DL, OC) are answered with the chosen option's words, not its
      letter (``data.answers='words'``, not EMIT's; the held-out questions and EMIT's parser are
      unchanged: it maps an answer without a letter to the closest option text), and the base
      stage runs 300 steps with the questions of those tasks on every image of the twelve
      datasets stage 1 draws (``base.fresh_datasets``, 7,392), half of them with the think
      instruction and half with the direct one (``base.fresh_direct``): object classification
      100.0 on the test split with seeds 0 and 1, 100.0 / 88.1 on the unseen dataset, where the
      letter answers stayed at chance (docs/training.md, "Answering with the option's words"
      and "Asking half the base stage's fresh questions directly");
    - not here: ``data.zoom`` (the query cropped at the heat map's maximum as a third image of
      the defect-classification questions) lifted seed 0's DC from 30.2 / 33.5 to 45.3 / 41.1
      (test / unseen) but not seed 1's, and AD fell in both (docs/training.md, "The zoom
      image"), so it stays off.

    ``--config.emit.reference_turns=4`` (16 references, not in EMIT) lifts the map's ceiling
    on the unseen images (82.7 -> 85.3) and the main job's test AD (80.1 -> 90.1), not its unseen
    AD (84.1), at twice stage 1's time, past the 20-minute budget, so it is not on here
    (docs/training.md, "The heat map's ceiling"); ``--config.emit.feature_turns=4`` (16
    references from turned ViT features, no extra ViT pass) keeps the budget and gives test AD
    85.8, unseen 83.8 ("Turning the reference's features").

    Measured on the 2-core CPU (stage 1 alone, soft prompt + projector, the LLM frozen): held-out
    AD 77.5 on the 392 images of an unseen dataset (``eval_unseen``, on here), against 58.1 with
    the tuned ViT and 57.4 with neither change."""
    c.data.ad_order = "yes_no"
    c.sft.update(dict(steps=300, lr=1e-2, fresh_datasets=12))
    c.base.train_vision = False  # the random ViT's heat map separates better than a tuned one
    c.emit.max_readout = True  # ... through its maximum, which a frozen LLM cannot take itself
    c.vision_init = "embedded"  # the packaged label-free ViT (emit_jax.training.vision_init)
    c.eval_unseen = 1
    # the embedded default's sequences: stage 1's and the held-out questions 174-386 tokens,
    # padded to 512 a third more LLM work than they need; the base stage's (176-603, median
    # 401, answers included) and stage 2's think prompts (236-579, median 429) stay at 512: a
    # bucket between (464) gained nothing measurable, for more compiled shapes (docs/training.md,
    # "Padding to the sequences' length")
    c.data.length_buckets = (392, *c.data.length_buckets)
    # the four-option tasks answered with the option's words (EMIT's parser maps them to the
    # closest option; EMIT trains the letter): the tiny model then names the object on every
    # held-out image (OC 100.0 on the test split and the unseen dataset with seed 0, 71.4 / 69.0
    # with seed 1, against 23.8 with letters) when its base stage also reads the three tasks'
    # questions on every image of the twelve datasets stage 1 draws anyway, for 300 steps
    # (150: it answers one word to all)
    c.data.answers = "words"
    # half of those asked with the direct instruction, as the held-out questions are: with think
    # questions only, the base stage's direct answers were mostly anomaly discrimination's, and
    # with seed 1 its letter took over the DC and DL answers (OC 71.4 / 69.0; with half direct
    # 100.0 / 88.1, AD 82.0 / 81.0 against 73.5 / 77.8; seed 0 unchanged or up: docs/training.md,
    # "Asking half the base stage's fresh questions directly")
    c.base.update(dict(steps=300, fresh_datasets=12, fresh_direct=0.5))
    c.eval_unseen_tasks = ()  # the unseen dataset asks all four tasks (1,008 questions)
    return c
