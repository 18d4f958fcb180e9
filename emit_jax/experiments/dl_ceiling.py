"""How far defect localization could go on the embedded default, answered in words or letters.

    python -m emit_jax.experiments.dl_ceiling --checkpoint DIR [--workdir W] [--unseen 1]
        [--config configs/grpo.py] [--json]

Defect localization asks which of four options names the defect's place; the options are
synonyms of nine regions (``emit_jax.data.prompts.REGION_SYNONYMS``: ``Left.``, ``Leftward.``,
``Left-hand.`` for the left cell). A model answering in words is scored by EMIT's parser, which
maps a response without a letter to the closest option text (``difflib``), so naming the right
region is not enough: its words have to land on the offered synonym. For every DL question of
the test split (``W/data/test.jsonl``) and of ``--unseen`` embedded datasets no stage saw,
this scores, with no model answering:

- **truth, in words**: the first synonym of the question's first true region (what a model
  that always knows the region and says its plain name gets);
- **truth, as the offered option**: 100 by construction (the letter, or the offered synonym);
- **map, in words**: the first synonym of the region of the contrastive heat map's maximum
  (query against the record's reference, the checkpoint's ViT, EMIT's CE layers and window
  scaled to it): what a perfect reader of EMIT's map, naming the region, gets;
- **map, as the offered option**: the option that is a synonym of the map's region, when one is
  offered (else a miss): what a perfect reader that also matches the synonyms gets;
- **map among the options**: the option whose region holds the map's highest value of the four
  offered (each cell's maximum): what a reader that reads the options first and then compares
  the map at their places gets. The distractors are cells without defect pixels, so this can
  beat the map's overall maximum, which lands on a cell the options do not offer when the
  defect spans cells.

``--answers W2/results.json`` (repeatable): a run's test-split DL answers (its ``answers``)
counted by the column (left / centre / right) of the map's maximum against the column of the
region the answer names: whether a model's localization answers follow the map at all.
"""

from __future__ import annotations

import json
import os

import numpy as np

from emit_jax import cli


def region_of(heat: np.ndarray) -> str:
    """The region (``prompts.REGIONS``, the 3 x 3 grid row-major) of a heat map's maximum."""
    from emit_jax.data.prompts import REGIONS
    from emit_jax.training.zoom import hottest_cell

    return REGIONS[hottest_cell(heat)]


def score(region: str, options: dict, answer: str) -> tuple[bool, bool]:
    """(in words, as the offered option): whether the region's first synonym is parsed to
    ``answer``, and whether the option that is one of the region's synonyms is ``answer``."""
    from emit_jax.data.prompts import REGION_SYNONYMS
    from emit_jax.eval.scoring import parse_answer

    words = parse_answer(REGION_SYNONYMS[region][0], options) == answer
    offered = [k for k, v in options.items() if v in REGION_SYNONYMS[region]]
    return words, bool(offered) and offered[0] == answer


def cell_maxima(heat: np.ndarray) -> np.ndarray:
    """(9,) the heat map's maximum inside each cell of the 3 x 3 grid (row-major), the cells cut
    as :func:`emit_jax.training.zoom.hottest_cell` assigns pixels."""
    h, w = heat.shape
    rows = np.minimum(2, np.arange(h) * 3 // h)
    cols = np.minimum(2, np.arange(w) * 3 // w)
    return np.array([heat[rows == r][:, cols == c].max() for r in range(3) for c in range(3)])


def among_options(heat: np.ndarray, options: dict) -> str:
    """The letter of the option whose region's cell holds the highest map value (ties: the first
    offered)."""
    from emit_jax.data.prompts import REGION_SYNONYMS, REGIONS

    cells = cell_maxima(heat)

    def value(text):
        region = answer_region(text)
        if region is None:
            raise ValueError(f"option {text!r} is not a region's synonym "
                             f"({sorted(REGION_SYNONYMS)})")
        return cells[REGIONS.index(region)]
    return max(options, key=lambda k: (value(options[k]), -ord(k)))


def measure(model, records: list[dict], *, batch: int = 8) -> dict:
    """The five figures (module docstring) in % over the DL records, and their count."""
    import jax.numpy as jnp

    from emit_jax.data.image import load_image, to_tile
    from emit_jax.data.prompts import REGIONS
    from emit_jax.experiments.feature_probes import official_heatmap
    from emit_jax.training.zoom import hottest_cell

    size = model.config.vision.image_size
    heat_fn, _ = official_heatmap(model)
    hits = {k: [] for k in ("truth_words", "map_words", "map_offered", "map_among")}
    cells, column = [], []
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        ce = np.stack([np.stack([to_tile(load_image(p), size) for p in r["images"][:2]])
                       for r in chunk])
        heat = np.asarray(heat_fn(jnp.asarray(ce)))
        for r, h in zip(chunk, heat):
            options = {chr(65 + k): o for k, o in enumerate(r["options"])}
            true = r["defect_location"][0]
            if true not in REGIONS:
                raise ValueError(f"record {r.get('id')}: defect_location {true!r} is not a region")
            hits["truth_words"].append(score(true, options, r["solution"])[0])
            words, offered = score(region_of(h), options, r["solution"])
            hits["map_words"].append(words)
            hits["map_offered"].append(offered)
            hits["map_among"].append(among_options(h, options) == r["solution"])
            cells.append(hottest_cell(h))
            column.append(cells[-1] % 3 == REGIONS.index(true) % 3)
    out = {k: 100.0 * float(np.mean(v)) for k, v in hits.items()}
    out["questions"] = len(records)
    out["map_cells"] = cells
    out["map_column_true"] = 100.0 * float(np.mean(column))  # the column the answers are read by
    return out


#: the columns of the 3 x 3 grid, and an answer that names no region
COLUMNS = ("left", "centre", "right", "none")


def answer_region(text: str) -> str | None:
    """The region (``prompts.REGIONS``) whose synonym ``text`` is, or None."""
    from emit_jax.data.prompts import REGION_OF

    return REGION_OF.get(text.strip())


def follow_table(records: list[dict], cells: list[int], answers: list[dict]) -> np.ndarray:
    """(3, 4) counts: rows the column of the map's maximum (``cells``, one per record), columns
    the column of the region each record's answer names (:data:`COLUMNS`). ``answers``: a
    results.json's ``answers``; each record's is the DL answer whose ``image`` ends its
    ``query``. Records with no answer are left out (the evaluation's ``eval_limit``); answers
    that match no record, or two answers for one record, are refused (another split)."""
    from emit_jax.data.prompts import REGIONS

    dl = [a for a in answers if a.get("question_type") == "Defect Localization"]
    table = np.zeros((3, 4), int)
    used = 0
    for r, cell in zip(records, cells):
        hit = [a for a in dl if r["query"].endswith("/" + a["image"]) or r["query"] == a["image"]]
        if len(hit) > 1:
            raise ValueError(f"record {r.get('id')}: {len(hit)} DL answers for its query "
                             f"{r['query']} (answers of another split?)")
        if not hit:
            continue
        used += 1
        region = answer_region(hit[0]["response"])
        table[cell % 3, 3 if region is None else REGIONS.index(region) % 3] += 1
    if used != len(dl):
        raise ValueError(f"{len(dl) - used} of the {len(dl)} DL answers match no record "
                         "(answers of another split?)")
    return table


def main(argv=None) -> int:
    p = cli.Parser(prog="python -m emit_jax.experiments.dl_ceiling",
                   description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="emit_jax or HF checkpoint (its ViT)")
    p.add_argument("--workdir", default="", help="a run's workdir: its data/test.jsonl")
    p.add_argument("--unseen", type=cli.int_in(0, 10), default=1)
    p.add_argument("--config", default="configs/grpo.py",
                   help="the run's config, for how the unseen questions are asked")
    p.add_argument("--answers", action="append", default=[],
                   help="a run's results.json: its test-split DL answers against the map's "
                        "column (needs --workdir; repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)

    from emit_jax import checkpoint, configs
    from emit_jax.errors import ConfigError
    from emit_jax.training import data as stage_data, stages

    if args.answers and not args.workdir:
        raise ConfigError("--answers: give --workdir too (the answers are the test split's)")
    answers = {}
    for path in args.answers:
        try:
            with open(path) as f:
                answers[path] = json.load(f)["answers"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--answers {path}: not a run's results.json with answers "
                              f"({type(e).__name__}: {e})") from None
    splits: dict = {}
    if args.workdir:
        path = os.path.join(args.workdir, "data", "test.jsonl")
        if not os.path.isfile(path):
            raise ConfigError(f"--workdir {args.workdir}: no data/test.jsonl")
        with open(path) as f:
            splits["test"] = [r for r in map(json.loads, f)
                              if r["task_type"] == "defect_localization"]
    if args.unseen:
        cfg = configs.load(args.config)
        splits["unseen"] = stage_data.unseen_records(
            args.unseen, tasks_=("defect_localization",), **stages.question_options(cfg))
    if not splits:
        raise ConfigError("nothing to measure: give --workdir or --unseen 1 or more")
    model = checkpoint.load_model_folder(args.checkpoint)[0]
    model = getattr(model, "mllm", model)
    res = {name: measure(model, recs) for name, recs in splits.items()}
    try:
        follows = {path: follow_table(splits["test"], res["test"]["map_cells"], a).tolist()
                   for path, a in answers.items()}
    except ValueError as e:
        raise ConfigError(f"--answers: {e}") from None
    if args.json:
        if follows:
            res["follow"] = follows
        print(json.dumps(res))
        return 0
    for name, r in res.items():
        print(f"{name} ({r['questions']} DL questions): truth in words {r['truth_words']:.1f}, "
              f"map in words {r['map_words']:.1f}, map as the offered option "
              f"{r['map_offered']:.1f}, map among the options {r['map_among']:.1f} (truth as "
              f"the offered option: 100)")
    if follows:
        print(f"the map's maximum is in the true region's column for "
              f"{res['test']['map_column_true']:.1f} % of the test split's DL questions")
    for path, table in follows.items():
        print(f"{path}: test-split DL answers by the map's column (rows) against the answer's "
              f"column ({' / '.join(COLUMNS)})")
        for name, row in zip(COLUMNS, table):
            print(f"  map {name}: {' / '.join(map(str, row))}")
    return 0


if __name__ == "__main__":
    cli.command(main, prog="python -m emit_jax.experiments.dl_ceiling")
