"""Annotations -> EMIT's four multiple-choice tasks (docs/reference/emit.md 9.2-9.5, docs/reference/mmad.md 10.2).

Per query image: Anomaly Discrimination (every image), Defect Classification (anomalies of known
type), Defect Localization (anomalies touching fewer than 9 grid cells), Object Classification
(normal images, query only). Options are drawn and shuffled with a random generator seeded by
(seed, image, task), so a question does not change when the dataset around it grows. The
reference image is the most similar normal image of the same class under an image embedding
(the model's own ViT by default); ``skip_rank1_for_anomalous=True`` reproduces the official
generator, which drops rank 1 for anomalous queries too and so uses the 2nd most similar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from emit_jax.data import prompts
from emit_jax.data.image import UNREADABLE, ImageError, load_image
from emit_jax.data.mvtec import DataError, ImageItem, Report, iter_classes

Embedder = Callable[[Sequence[str]], np.ndarray]  # image paths -> [N, D]


# ------------------------------------------------------------------------------ the 3x3 grid
def mask_cell_counts(mask: np.ndarray) -> np.ndarray:
    """Non-zero pixels per cell of the 3x3 grid, in ``prompts.REGIONS`` order. Row bands are
    ``[0, h//3), [h//3, 2h//3), [2h//3, h)``; columns likewise (docs/reference/emit.md 9.5).

    ``mask``: [H, W], [H, W, C] with C in (1, 3, 4) (the first channel counts) or [C, H, W]
    (any channel); H or W may be 0 or smaller than 3 (the empty bands count 0). Any other
    shape (not 2-D or 3-D, or [0, H, W]) raises ValueError. The counts are >= 0 and sum to the
    mask plane's non-zero pixels."""
    m = np.asarray(mask)
    if m.ndim == 3:
        if m.shape[-1] not in (1, 3, 4) and m.shape[0] == 0:
            raise ValueError(f"mask of shape {m.shape} has no channels")
        m = m[..., 0] if m.shape[-1] in (1, 3, 4) else m.max(axis=0)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (or 3-D with a channel axis), got shape {m.shape}")
    h, w = m.shape
    rb = (0, h // 3, 2 * h // 3, h)
    cb = (0, w // 3, 2 * w // 3, w)
    return np.array([np.count_nonzero(m[rb[r]:rb[r + 1], cb[c]:cb[c + 1]])
                     for r in range(3) for c in range(3)], np.int64)


def defect_regions(counts: np.ndarray) -> list[str]:
    """Region names holding defect pixels, largest area first (ties in grid order)."""
    order = sorted((i for i in range(9) if counts[i] > 0), key=lambda i: (-counts[i], i))
    return [prompts.REGIONS[i] for i in order]


def localization_options(counts: np.ndarray, rng: random.Random) -> tuple[list[str], int] | None:
    """(option strings, answer index) or None when no question is made (no defect, or all 9
    cells touched). Distractors: 3 defect-free cells, with replacement when fewer than 3 exist
    (the official quirk); each option rendered as a random synonym."""
    regions = defect_regions(counts)
    if not regions or len(regions) == 9:
        return None
    answer = regions[0]
    free = [r for r in prompts.REGIONS if r not in regions]
    distractors = rng.sample(free, 3) if len(free) >= 3 else [rng.choice(free) for _ in range(3)]
    cells = distractors + [answer]
    rng.shuffle(cells)
    idx = cells.index(answer)  # with replacement, a repeated distractor never equals the answer
    return [rng.choice(prompts.REGION_SYNONYMS[c]) for c in cells], idx


def choice_options(answer: str, candidates: Sequence[str], k: int, rng: random.Random
                   ) -> tuple[list[str], int]:
    """k-1 distractors sampled without replacement from ``candidates - {answer}``, plus the
    answer, shuffled (docs/reference/emit.md 9.4). k shrinks when there are too few candidates."""
    pool = sorted(set(candidates) - {answer})
    k = min(k, len(pool) + 1)
    opts = rng.sample(pool, k - 1) + [answer]
    rng.shuffle(opts)
    return opts, opts.index(answer)


# ------------------------------------------------------------------------------ references
def pixel_embedder(size: int = 32) -> Embedder:
    """A model-free embedding: the image as ``size`` x ``size`` greyscale, centred. For building
    data without a checkpoint."""
    def embed(paths):
        out = []
        for p in paths:
            im = load_image(p).convert("L").resize((size, size), Image.BILINEAR)
            v = np.asarray(im, np.float32).reshape(-1)
            out.append(v - v.mean())
        return np.stack(out) if out else np.zeros((0, size * size), np.float32)
    return embed


def vit_embedder(model, batch: int = 8) -> Embedder:
    """The model's own ViT: the mean of the last layer's patch tokens of the whole image
    squashed to one tile."""
    import jax.numpy as jnp

    from emit_jax.data.image import to_tile

    mllm = getattr(model, "mllm", model)
    vit, size = mllm.vision_tower, mllm.config.vision.image_size

    def embed(paths):
        out = []
        for i in range(0, len(paths), batch):
            tiles = np.stack([to_tile(load_image(p), size) for p in paths[i:i + batch]])
            feats = vit(jnp.asarray(tiles))[:, 1:].mean(axis=1)
            out.append(np.asarray(feats, np.float32))
        return np.concatenate(out) if out else np.zeros((0, mllm.config.vision.hidden_size))
    return embed


def readable(items: Sequence[ImageItem], report: Report) -> list[ImageItem]:
    """The items whose image Pillow reads (each decoded once); each other one (not an image,
    truncated, a decompression bomb) is reported to ``report``: raised, or skipped and counted.
    ``--policy skip`` runs this first, so an unreadable image drops out instead of stopping the
    reference search."""
    out = []
    for it in items:
        try:
            load_image(it.path)
        except ImageError as e:
            report.problem(str(e))
            continue
        out.append(it)
    return out


def select_references(items: Sequence[ImageItem], embed: Embedder, *,
                      pool: Callable[[ImageItem], bool] | None = None,
                      skip_rank1_for_anomalous: bool = False) -> dict[str, str]:
    """query path -> most similar normal image (cosine) of the same class, never itself.
    ``pool`` restricts which normal images may serve (default: every normal image)."""
    refs: dict[str, str] = {}
    for _, cls_items in iter_classes(list(items)):
        normals = [it for it in cls_items if not it.is_anomalous and (pool is None or pool(it))]
        if len(normals) < 2:
            continue
        paths = [it.path for it in normals]
        nvec = _unit(embed(paths))
        queries = [it.path for it in cls_items]
        qvec = _unit(embed(queries))
        sims = qvec @ nvec.T
        index = {p: i for i, p in enumerate(paths)}
        for qi, it in enumerate(cls_items):
            order = list(np.argsort(-sims[qi], kind="stable"))
            if it.path in index:
                order.remove(index[it.path])
            elif skip_rank1_for_anomalous:
                order = order[1:]
            if order:
                refs[it.path] = paths[order[0]]
    return refs


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------ questions
@dataclasses.dataclass(frozen=True)
class Question:
    task: str
    options: tuple[str, ...]
    answer: str  # letter
    images: tuple[str, ...]  # [reference, query], [query] (OC) or [reference] (text sample)
    user: str  # the user turn, with <image> placeholders
    meta: dict


def _rng(seed: int, *parts) -> random.Random:
    h = hashlib.sha256(":".join(map(str, (seed,) + parts)).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


def read_mask(item: ImageItem) -> np.ndarray:
    """The defect mask as a 2-D array; its size must equal the image's."""
    try:
        with Image.open(item.mask_path) as m:
            m.load()
            mask = np.asarray(m.convert("L"))
    except UNREADABLE as e:
        raise DataError(f"{item.mask_path}: not a readable mask ({e})") from None
    try:
        with Image.open(item.path) as im:
            size = im.size
    except UNREADABLE as e:
        raise ImageError(f"{item.path}: not a readable image ({e})") from None
    if mask.shape[::-1] != size:
        raise DataError(f"{item.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]}, its image "
                        f"{item.path} is {size[0]}x{size[1]}")
    return mask


AD_ORDERS = ("shuffled", "yes_no")


def build_questions(items: Sequence[ImageItem], *, stage: int, seed: int = 0,
                    references: Mapping[str, str],
                    domain_knowledge: Mapping[str, Mapping[str, str]] | None = None,
                    defect_names: Sequence[str] | None = None,
                    object_names: Sequence[str] | None = None,
                    tasks: Sequence[str] | None = None, think: bool | None = None,
                    text_samples: bool = False, report: Report | None = None,
                    dk_sentences: int = 0, ad_order: str = "shuffled") -> list[Question]:
    """Questions for ``items``. Stage 1: Anomaly Discrimination + Defect Localization, direct
    answers; stage 2: all four tasks with the think instruction (``tasks`` / ``think``
    override). ``domain_knowledge``: class -> {defect: text, 'good': text}. ``text_samples``:
    also a text-as-query copy of each image that has an object description. ``dk_sentences``:
    keep only that many sentences of each domain-knowledge entry (0: all, as EMIT).
    ``ad_order``: the two anomaly-discrimination options drawn in random order (``shuffled``,
    docs/reference/emit.md 9.4) or always ``A. Yes.`` / ``B. No.`` (``yes_no``, as MMAD asks them)."""
    if ad_order not in AD_ORDERS:
        raise ValueError(f"ad_order must be one of {AD_ORDERS}, got {ad_order!r}")
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    report = report or Report()
    tasks = tuple(tasks or ((prompts.TASKS[0], prompts.TASKS[2]) if stage == 1 else prompts.TASKS))
    unknown = set(tasks) - set(prompts.TASKS)
    if unknown:
        raise ValueError(f"unknown task type(s) {sorted(unknown)}; known: {prompts.TASKS}")
    think = (stage == 2) if think is None else think
    defect_names = sorted({prompts.process_string(d) for d in (
        defect_names or [it.defect for it in items if it.defect])})
    object_names = sorted({prompts.process_string(o) for o in (
        object_names or [it.object_type for it in items])})
    dk_all = domain_knowledge or {}
    out: list[Question] = []
    for it in items:
        try:
            out.extend(_questions_for(it, tasks, think, seed, references, dk_all, defect_names,
                                      object_names, text_samples, dk_sentences, ad_order, report))
        except (DataError, ImageError) as e:
            report.problem(str(e))
    return out


def _questions_for(it, tasks, think, seed, references, dk_all, defect_names, object_names,
                   text_samples, dk_sentences=0, ad_order="shuffled", report=None):
    anomalous, regions, counts = it.is_anomalous, [], None
    if anomalous:
        counts = mask_cell_counts(read_mask(it))
        regions = defect_regions(counts)
        if not regions:
            anomalous = False  # an empty mask: relabelled normal (docs/reference/emit.md 9.5)
            if report is not None:
                report.relabelled.append(it.path)
    ref = references.get(it.path)
    meta = {"query": it.path, "object_type": it.object_type, "dataset": it.dataset,
            "adlabel": int(anomalous),
            "anomaly_type": it.defect if anomalous else None, "mask_path": it.mask_path,
            "defect_location": regions, "split": it.split}
    queries = [("image", None)]
    if text_samples and it.description:
        queries.append(("text", it.description))
    out = []
    for chat_type, description in queries:
        # keyed by the path inside the dataset: the same dataset copied elsewhere asks the
        # same questions (an absolute path drew other options in each folder)
        key = (it.rel or it.path, chat_type)
        dk = prompts.domain_knowledge_text(dk_all.get(it.object_type, {}), _rng(seed, *key, "dk"),
                                           dk_sentences) if dk_all else ""

        def add(task, options, idx, images):
            user = prompts.render(task, options, think=think, dk=dk, description=description)
            out.append(Question(task, tuple(options), prompts.LETTERS[idx], tuple(images), user,
                                dict(meta, task_type=task, chat_type=chat_type)))

        two = ([ref] if description is not None else [ref, it.path]) if ref else None
        if "anomaly_discrimination" in tasks and two:
            if ad_order == "yes_no":  # MMAD's order: the letter is the belief
                opts, idx = ["Yes.", "No."], 0 if anomalous else 1
            else:
                opts, idx = choice_options("Yes." if anomalous else "No.", ["Yes.", "No."], 2,
                                           _rng(seed, *key, "ad"))
            add("anomaly_discrimination", opts, idx, two)
        if anomalous and it.defect and "defect_classification" in tasks and two:
            opts, idx = choice_options(prompts.process_string(it.defect), defect_names, 4,
                                       _rng(seed, *key, "dc"))
            if len(opts) >= 2:
                add("defect_classification", opts, idx, two)
        if anomalous and "defect_localization" in tasks and two:
            loc = localization_options(counts, _rng(seed, *key, "dl"))
            if loc is not None:
                add("defect_localization", loc[0], loc[1], two)
        if not anomalous and "object_classification" in tasks and description is None:
            opts, idx = choice_options(prompts.process_string(it.object_type), object_names, 4,
                                       _rng(seed, *key, "oc"))
            if len(opts) >= 2:
                add("object_classification", opts, idx, [it.path])
    return out
