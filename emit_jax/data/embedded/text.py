"""The dataset's texts: domain knowledge per class and defect (EMIT's released format) and an
object description per image (text-as-query samples, docs/reference/emit.md 9.7)."""

from __future__ import annotations

import numpy as np

from emit_jax.data.embedded.assets import _pill_description
from emit_jax.data.embedded.catalogue import (
    CLASS_DEFECTS, CLASS_INFO, DATASET_NAME, LOCATION_PHRASE,
)
from emit_jax.data.embedded.sample import Sample


def _defect_title(defect: str) -> str:
    return defect.replace("_", " ").title()


def _defect_knowledge(cls: str, defect: str) -> str:
    info = CLASS_INFO[cls]
    contrast = "darker" if info.tone == "light" else "brighter"
    text = {
        "scratch": (f'A "scratch" on the "{cls}" appears as a thin, smooth line or gentle curve, '
                    f"a few pixels wide and many times longer than it is wide, drawn across the "
                    f"{info.surface}. It is clearly {contrast} than the surrounding material, "
                    f"stays on the object and does not follow any edge or pattern of a normal "
                    f"{info.noun}."),
        "crack": (f'A "crack" on the "{cls}" is a dark, jagged line made of short straight '
                  f"segments that change direction, often with a side branch. It is much darker "
                  f"than the {info.colour} material and splits the otherwise continuous "
                  f"{info.surface}."),
        "hole": (f'A "hole" in the "{cls}" is a small, roughly elliptical, very dark spot with a '
                 f"sharp border, about 20 to 35 pixels across, that darkens towards its middle as "
                 f"if the material were pierced. A normal {info.noun} has no dark pits on its "
                 f"{info.surface}."),
        "contamination": (f'"Contamination" on the "{cls}" is a compact, irregular blob of foreign '
                          f"material (brown, black, greenish, yellowish or bluish) with a grainy "
                          f"texture. Its colour does not belong to the {info.colour} {info.noun} "
                          f"and it covers the surface beneath it completely."),
        "color_stain": (f'A "color stain" on the "{cls}" is a rounded, translucent patch where '
                        f"the {info.colour} surface takes on a foreign tint (reddish, amber, "
                        f"bluish, brownish or greenish). The texture underneath stays visible "
                        f"through the tint, and the patch has a soft, smooth boundary."),
        "missing_piece": (f'A "missing piece" of the "{cls}" is a chunk broken away from its '
                          f"edge: the outline is no longer {info.outline}, and "
                          f"{info.background} shows through where material should be. The "
                          f"break has an irregular, roughly rounded border."),
    }[defect]
    return f"<{_defect_title(defect)} Defect>\n Description: {text}"


def _normal_knowledge(cls: str) -> str:
    info = CLASS_INFO[cls]
    text = (f'A standard "{cls}" is {info.appearance}. Its {info.surface} looks uniform '
            f"({info.colour}) and it lies on {info.background}. On a normal {info.noun} "
            f"{info.checks}. Small changes in position, rotation, exposure and fine grain between "
            f"images are normal and are not defects.")
    return f"<Normal Characteristics>\n Description: {text}"


def domain_knowledge() -> dict[str, dict[str, dict[str, str]]]:
    """``{"Embedded": {class: {defect: text, ..., "good": text}}}`` in the released EMIT format."""
    out: dict[str, dict[str, str]] = {}
    for cls, defects in CLASS_DEFECTS.items():
        entries = {d: _defect_knowledge(cls, d) for d in defects}
        entries["good"] = _normal_knowledge(cls)
        out[cls] = entries
    return {DATASET_NAME: out}


def _defect_sentence(sample: Sample) -> str:
    info = CLASS_INFO[sample.cls]
    where = LOCATION_PHRASE[sample.location or "center"]
    phrase = {
        "scratch": f"a thin, {sample.word} scratch running across the {info.surface}",
        "crack": "a dark, jagged crack with a short side branch",
        "hole": "a small, dark, elliptical hole that looks as if the material were pierced",
        "contamination": f"a grainy blob of {sample.word} foreign material stuck to the surface",
        "color_stain": f"a translucent {sample.word} stain discolouring the surface",
        "missing_piece": (f"a missing piece: a chunk of the {info.noun}'s edge is broken away "
                          f"and the background shows through"),
    }[sample.sub]
    return f"Upon closer inspection, there is {phrase}, located in the {where} part of the image."


def description(sample: Sample, rng: np.random.Generator) -> str:
    """An object description paragraph for ``sample`` (a text-as-query sample, docs/reference/emit.md 9.7)."""
    info = CLASS_INFO[sample.cls]
    if sample.sub == "good" and sample.base is not None:
        return _pill_description(sample.base)
    opening = rng.choice(["The object in the image appears to be",
                          "The image shows what appears to be",
                          "The object in the query image appears to be"])
    first = f"{opening} {info.appearance}."
    if sample.sub == "good":
        return (f"{first} Upon inspecting the {info.noun} for defects or anomalies, I do not "
                f"observe any deviations from the expected appearance: {info.checks}. There are "
                f"no visible scratches, cracks, holes, foreign particles, stains or missing "
                f"parts.\n\nIn summary, the {info.noun} in the image matches the normal pattern "
                f"of this object type and shows no defects or anomalies.")
    where = LOCATION_PHRASE[sample.location or "center"]
    name = sample.sub.replace("_", " ")
    return (f"{first} {_defect_sentence(sample)} This area deviates from the normal pattern of "
            f"the object, in which {info.checks}. Apart from this region the {info.noun} looks "
            f"normal.\n\nIn summary, the {info.noun} in the image is defective: it shows a "
            f"{name} defect in the {where} region.")
