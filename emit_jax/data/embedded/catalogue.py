"""What the embedded dataset holds: its version, image size and counts, the classes and their
defect folders, the 3x3 grid cells and how texts name them, the foreign colours of
contamination and stains, and the words describing a normal object of each class."""

from __future__ import annotations

import dataclasses

GENERATOR_VERSION = "2"
DATASET_NAME = "Embedded"
IMAGE_SIZE = 224  # the tiny architecture's tile
N_TRAIN_GOOD = 12
N_TEST_GOOD = 12
N_PER_DEFECT = 8
MIN_DEFECT_PIXELS = 250
MAX_DEFECT_TRIES = 200

DEFECTS = ("scratch", "crack", "hole", "contamination", "color_stain", "missing_piece")

#: Defect folders per class (order = folder order in the manifest and domain knowledge).
CLASS_DEFECTS: dict[str, tuple[str, ...]] = {
    "pill": ("crack", "contamination", "color_stain", "scratch", "missing_piece"),
    "screw": ("scratch", "missing_piece", "contamination"),
    "nut": ("scratch", "hole", "color_stain", "missing_piece"),
    "capsule": ("crack", "hole", "color_stain", "scratch"),
    "tile": ("crack", "hole", "contamination", "color_stain"),
    "cable": ("crack", "contamination", "color_stain", "missing_piece"),
    "washer": ("scratch", "crack", "hole", "missing_piece"),
}
CLASSES = tuple(CLASS_DEFECTS)

#: The 3x3 grid cells in docs/reference/emit.md 9.5's order, and how descriptions name them.
GRID_CELLS = ("top left", "top", "top right", "left", "center", "right",
              "bottom left", "bottom", "bottom right")
LOCATION_PHRASE = {"top left": "upper left", "top": "top center", "top right": "upper right",
                   "left": "left", "center": "center", "right": "right",
                   "bottom left": "lower left", "bottom": "bottom center",
                   "bottom right": "lower right"}

#: Foreign colours (name, RGB) for contamination and stains; the one farthest from the object wins.
CONTAMINANTS = (("brown", (92, 58, 30)), ("black", (30, 30, 32)), ("greenish", (70, 115, 45)),
                ("yellowish", (205, 185, 70)), ("bluish", (55, 75, 150)))
STAIN_TINTS = (("reddish", (205, 50, 40)), ("amber", (215, 150, 30)), ("bluish", (50, 90, 210)),
               ("brownish", (120, 70, 30)), ("greenish", (60, 160, 60)))


@dataclasses.dataclass(frozen=True)
class ClassInfo:
    """Words describing a normal object of a class (templates fill them in)."""

    noun: str
    appearance: str  # "... appears to be {appearance}."
    surface: str
    colour: str
    background: str
    outline: str
    tone: str  # "light" or "dark": which way scratches contrast
    checks: str  # what looks right on a normal one


CLASS_INFO: dict[str, ClassInfo] = {
    "pill": ClassInfo(
        noun="pill",
        appearance=('an oval-shaped pill with a smooth surface, predominantly white with small red '
                    'specks, and the capital letters "FF" embossed in its center'),
        surface="smooth, matte white coating", colour="white with red specks",
        background="a dark, almost black background", outline="a clean, unbroken oval",
        tone="light",
        checks='the oval outline is complete, the "FF" imprint is clear and the red speckles are '
               'evenly spread over a uniform white surface'),
    "screw": ClassInfo(
        noun="screw",
        appearance="a steel screw seen from the side, with a flat head, a threaded shaft and a "
                    "pointed tip, lying at an arbitrary angle",
        surface="grey, metallic, cylindrically shaded surface", colour="metallic grey",
        background="a plain light grey background", outline="a straight head-shaft-tip profile",
        tone="light",
        checks="the head, the regular thread and the pointed tip are all present and the metal "
               "has an even grey sheen"),
    "nut": ClassInfo(
        noun="nut",
        appearance="a hexagonal metal nut seen from above, with a round threaded hole in its "
                    "middle and bevelled outer corners",
        surface="brushed silver-grey metal face", colour="silver-grey",
        background="a dark grey background", outline="a regular hexagon with a round hole",
        tone="light",
        checks="all six sides and corners are intact, the central hole is round and the metal "
               "face shows only its fine brushed pattern"),
    "capsule": ClassInfo(
        noun="capsule",
        appearance="an elongated two-piece capsule lying roughly horizontally, its left half "
                    "dark red and its right half ivory, joined at a thin seam",
        surface="glossy gelatin shell with a soft highlight along its length",
        colour="dark red and ivory", background="a light grey-blue background",
        outline="a smooth, rounded stadium shape", tone="light",
        checks="both halves have uniform colour, the seam is straight and the rounded ends are "
               "complete"),
    "tile": ClassInfo(
        noun="tile",
        appearance="a close-up of a beige-grey ceramic tile surface that fills the whole image, "
                    "sprinkled with small darker and lighter specks",
        surface="finely speckled ceramic surface", colour="beige-grey with speckles",
        background="the tile surface itself", outline="a continuous surface", tone="light",
        checks="the speckle pattern is evenly distributed and the surface is continuous with no "
               "lines, pits or patches"),
    "cable": ClassInfo(
        noun="cable",
        appearance="the cross-section of a round cable: a grey sheath holding three insulated "
                    "wires, green, blue and brown in clockwise order, each with a stranded "
                    "copper core",
        surface="grey sheath filler and coloured wire insulation", colour="grey, green, blue, "
                "brown and copper", background="a plain off-white background",
        outline="a full circle", tone="light",
        checks="the sheath is a complete circle and the three wires have clean insulation and "
               "shiny copper strands"),
    "washer": ClassInfo(
        noun="washer",
        appearance="a flat round metal washer seen from above: a ring with a central hole, "
                    "showing fine concentric brushing marks",
        surface="brushed metallic ring face", colour="metallic grey",
        background="a dark blue-grey background", outline="two clean concentric circles",
        tone="light",
        checks="the inner and outer edges are clean circles and the metal shows only its "
               "concentric brushing"),
}
