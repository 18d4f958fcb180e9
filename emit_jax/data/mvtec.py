"""MVTec-AD-style datasets (MVTec AD, MPDD, VisA and BTAD in that layout, the embedded dataset)::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/good/*.png            (BTAD: ok/)
    <root>/<class>/test/<defect>/*.png
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png

``scan`` lists every image as an :class:`ImageItem`. Masks are paired by file stem
(``000.png`` <-> ``000_mask.png`` or ``000.png``); the official generator zips the two sorted
lists, which agrees whenever every image has its mask. Defect folders ``ko`` and ``anomalous``
have an unknown type (``defect=None``, docs/reference/emit.md 9.2). Problems are reported through a
:class:`Report` under the ``error`` (raise) or ``skip`` (count and continue) policy.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import unicodedata
from typing import Iterator

from emit_jax.errors import DataError, not_utf8, show_path
from emit_jax.fileio import pairs_noting_duplicates, read_json, read_text

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD_DIRS = ("good", "ok")
UNKNOWN_TYPE_DIRS = ("ko", "anomalous")


@dataclasses.dataclass
class Report:
    """Counts what a reader or builder skipped under ``policy='skip'``."""

    policy: str = "error"
    skipped: list[str] = dataclasses.field(default_factory=list)
    # anomalous images whose mask is empty, asked about as normal (docs/reference/emit.md 9.5)
    relabelled: list[str] = dataclasses.field(default_factory=list)
    # images a splits.json does not list (their split is "unlisted")
    unlisted: list[str] = dataclasses.field(default_factory=list)
    # image folders (test/<defect>/, train/good/) holding no image
    empty: list[str] = dataclasses.field(default_factory=list)
    # mask files in ground_truth/ that belong to no image (a missing or misnamed test image)
    stray_masks: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ("error", "skip"):
            raise ValueError(f"policy must be 'error' or 'skip', got {self.policy!r}")

    def problem(self, message: str) -> None:
        """Raise (policy 'error') or record and continue (policy 'skip')."""
        if self.policy == "error":  # (the run stops: not "skipped", as the message may say)
            raise DataError(message.removesuffix("; skipped"))
        self.skipped.append(message)

    def relabelled_note(self) -> str | None:
        """One ``note:`` line for the anomalous images relabelled normal, or None."""
        paths = sorted(set(self.relabelled))
        if not paths:
            return None
        return (f"note: {len(paths)} anomalous image(s) have an all-black mask and are asked about "
                f"as normal images, as EMIT does (first: {paths[0]})")

    def unlisted_note(self) -> str | None:
        """One ``note:`` line for the images a ``splits.json`` does not list, or None."""
        if not self.unlisted:
            return None
        return (f"note: {len(self.unlisted)} image(s) are not listed in splits.json; they form "
                f"the split 'unlisted', used by no stage (first: {sorted(self.unlisted)[0]})")

    def empty_note(self) -> str | None:
        """One ``note:`` line for the image folders that hold no image, or None (before: an
        empty or misplaced defect folder was dropped without a word)."""
        if not self.empty:
            return None
        return (f"note: {len(self.empty)} image folder(s) hold no image and ask no question "
                f"(first: {sorted(self.empty)[0]})")

    def stray_note(self) -> str | None:
        """One ``note:`` line for the masks no image uses, or None (before: a mask whose image
        was missing or misnamed, ``007.PNG`` for ``007.png``'s mask, was ignored silently)."""
        if not self.stray_masks:
            return None
        return (f"note: {len(self.stray_masks)} mask(s) in ground_truth/ belong to no image "
                f"(a missing or misnamed test image?) and are not used (first: "
                f"{sorted(self.stray_masks)[0]})")

    def say_notes(self) -> None:
        """Print :meth:`relabelled_note`, :meth:`unlisted_note`, :meth:`empty_note` and
        :meth:`stray_note` to stderr, those there are."""
        for note in (self.relabelled_note(), self.unlisted_note(), self.empty_note(),
                     self.stray_note()):
            if note:
                print(note, file=sys.stderr)

    def summary(self) -> str:
        return f"skipped {len(self.skipped)}" + (f" (first: {self.skipped[0]})" if self.skipped else "")


@dataclasses.dataclass(frozen=True)
class ImageItem:
    path: str  # absolute
    dataset: str
    object_type: str
    split: str  # "train" | "test", or the split named in splits.json
    defect: str | None  # None: a normal image, or an anomaly of unknown type (see is_anomalous)
    is_anomalous: bool
    mask_path: str | None = None
    description: str | None = None  # object description text (text-as-query samples)
    rel: str | None = None  # the path inside the dataset folder: what keys its questions' draws


def utf8_name(name: str) -> bool:
    """Whether a name from ``os.listdir`` is valid UTF-8 (Python hands the bytes of one that is
    not over as lone surrogates, which no JSON file, hash or message can encode)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _named(folder: str, names, report: Report) -> list[str]:
    """``names`` of ``folder`` that are valid UTF-8; each other one is a problem (named by the
    repr of its bytes)."""
    good = []
    for name in names:
        if utf8_name(name):
            good.append(name)
        else:
            report.problem(f"{folder}: name {os.fsencode(name)!r} "
                           f"{not_utf8(os.fsencode(name), 'rename it')}")
    return good


def _images(folder: str, report: Report | None = None) -> list[str]:
    if not os.path.isdir(folder):
        return []
    names = [f for f in os.listdir(folder)
             if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return sorted(os.path.join(folder, f) for f in _named(folder, names, report or Report()))


def _class_dirs(root: str, report: Report | None = None) -> list[str]:
    if any(os.path.isdir(os.path.join(root, d)) for d in ("train", "test")):
        return [root]  # a single class folder
    entries = sorted(os.listdir(root))
    names = [d for d in entries if os.path.isdir(os.path.join(root, d, "test"))
             or os.path.isdir(os.path.join(root, d, "train"))]
    report = report or Report()
    for d in entries:  # a class's masks without its images: not passed over
        if d not in names and os.path.isdir(os.path.join(root, d, "ground_truth")):
            report.problem(f"{os.path.join(root, d)}: a class folder with ground_truth/ but no "
                           "train/ or test/ image folders; skipped")
    return sorted(os.path.join(root, d) for d in _named(root, names, report))


def _masks(cdir: str) -> list[str]:
    """The mask files under ``cdir/ground_truth/<defect>/`` (absolute; none where a folder
    cannot be listed)."""
    out = []
    gt = os.path.join(cdir, "ground_truth")
    try:
        subs = sorted(os.listdir(gt)) if os.path.isdir(gt) else []
        for sub in subs:
            folder = os.path.join(gt, sub)
            for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
                path = os.path.abspath(os.path.join(folder, name))
                if name.lower().endswith(IMAGE_EXTS) and not name.startswith(".") and \
                        os.path.isfile(path):
                    out.append(path)
    except OSError:
        pass
    return out


def _find_mask(gt_dir: str, stem: str) -> str | None:
    """The mask of image ``stem`` in ``gt_dir``: ``<stem>_mask.png``, ``<stem>.png`` or
    ``<stem>_mask.jpg``, the extension in any case (``000_mask.PNG``, as images are found)."""
    wanted = (f"{stem}_mask.png", f"{stem}.png", f"{stem}_mask.jpg")
    for name in wanted:
        p = os.path.join(gt_dir, name)
        if os.path.isfile(p):
            return p
    try:
        names = sorted(os.listdir(gt_dir))
    except OSError:
        return None
    for want in wanted:  # the extension in another case
        base, ext = os.path.splitext(want)
        for name in names:
            n_base, n_ext = os.path.splitext(name)
            if n_base == base and n_ext.lower() == ext and os.path.isfile(
                    os.path.join(gt_dir, name)):
                return os.path.join(gt_dir, name)
    return None


def split_names(root: str) -> list[str]:
    """The split names ``root/splits.json`` gives, in its order (none without the file)."""
    splits = _read_splits(root)
    if splits is None:
        return []
    data = read_json(os.path.join(root, "splits.json"), error=DataError)
    return list(data) if isinstance(data, dict) else []


def _read_splits(root: str) -> dict[str, str] | None:
    path = os.path.join(root, "splits.json")
    if not os.path.lexists(path):  # a link to nothing or a pipe there is refused, not ignored
        return None
    data = read_json(path, error=DataError, what="a valid splits file",
                     object_pairs_hook=pairs_noting_duplicates)
    if not isinstance(data, dict):
        raise DataError(f"{path}: not a valid splits file (a JSON object of split -> list of "
                        f"image paths expected, got {type(data).__name__})")
    if data.duplicates:  # json would keep the last list given for a split
        raise DataError(f"{path}: not a valid splits file (the key {data.duplicates[0]!r} is "
                        "given twice)")
    out: dict[str, str] = {}
    try:
        for split, paths in data.items():
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise DataError(f"{path}: split {split!r} is not a list of image paths")
            for p in paths:
                if os.path.isabs(p) or os.path.normpath(p).split(os.sep)[0] == os.pardir:
                    # before: dropped without a word (they matched no image found)
                    raise DataError(f"{path}: split {split!r} lists {p}, outside the dataset's "
                                    "own paths; name images relative to the dataset folder "
                                    "(e.g. pill/train/good/000.png)")
                p = os.path.normpath(p)
                if out.setdefault(p, split) != split:  # a test image trained on, or the reverse
                    raise DataError(f"{path}: {p} is listed in two splits ({out[p]!r} and "
                                    f"{split!r}); each image belongs to one")
    except (AttributeError, TypeError) as e:  # not {split: [path, ...]}
        raise DataError(f"{path}: not a valid splits file ({e})") from None
    return out


def _description(root: str, path: str, obj: str, split: str, sub: str,
                 report: Report) -> str | None:
    """An object description for text-as-query samples: ``<image>.txt`` beside the image, or
    ``<root>/descriptions/<class>/<split>_<folder>_<stem>.txt`` (the embedded dataset). Only
    regular files are read (a pipe there never blocks); one that is not UTF-8 is a problem of
    ``report`` (an error, or skipped and counted)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    for txt in (os.path.splitext(path)[0] + ".txt",
                os.path.join(root, "descriptions", obj, f"{split}_{sub}_{stem}.txt")):
        if os.path.isfile(txt):
            try:
                return read_text(txt, error=DataError).strip()
            except DataError as e:
                report.problem(f"{e}; the image's description is left out")
                return None
    return None


def scan(root: str | os.PathLike, *, dataset: str | None = None,
         report: Report | None = None) -> list[ImageItem]:
    """Every image of an MVTec-style dataset (``root`` holds class folders, or is one)."""
    root = os.path.abspath(os.fspath(root))
    report = report or Report()
    if not os.path.isdir(root):
        if os.path.islink(root) and not os.path.exists(root):
            raise DataError(f"{show_path(root)}: a symbolic link to nothing (or a link loop), not a "
                            "dataset folder")
        if os.path.exists(root):
            raise DataError(f"{show_path(root)}: a file, not a dataset folder (MVTec AD layout: class "
                            "folders with train/ and test/)")
        raise DataError(f"{show_path(root)}: no such dataset folder")
    if not utf8_name(root):
        raise DataError(f"{os.fsencode(root)!r}: the dataset folder's path "
                        f"{not_utf8(os.fsencode(root), 'rename it')}")
    dataset = dataset or os.path.basename(root.rstrip("/"))
    splits = _read_splits(root)
    items: list[ImageItem] = []
    classes = _class_dirs(root, report)
    if not classes:
        if os.path.isfile(os.path.join(root, "mmad.json")):  # (nineteenth probe TR: not said)
            raise DataError(f"{root}: an MMAD benchmark folder (mmad.json), which evaluate "
                            "takes; training and data.build take an MVTec AD-style folder "
                            "(CLASS/train/good/, CLASS/test/DEFECT/)")
        raise DataError(f"{root}: no class folders with train/ or test/ (expected MVTec AD layout)")
    for cdir in classes:
        obj = os.path.basename(cdir)
        for split in ("train", "test"):
            sdir = os.path.join(cdir, split)
            if not os.path.isdir(sdir):
                if os.path.lexists(sdir):  # before: its images silently dropped, "skipped": 0
                    report.problem(f"{sdir}: not a folder (expected {split}/<good or defect>/ "
                                   "image folders); skipped")
                continue
            for sub in sorted(_named(sdir, os.listdir(sdir), report)):
                folder = os.path.join(sdir, sub)
                if not os.path.isdir(folder):
                    if not sub.startswith("."):  # before: skipped without a count
                        report.problem(f"{folder}: not a folder (expected {split}/<good or "
                                       "defect>/ image folders); skipped")
                    continue
                good = sub.lower() in GOOD_DIRS
                if split == "train" and not good:
                    report.problem(f"{folder}: training folders must be normal ('good'); skipped")
                    continue
                found = _images(folder, report)
                if not found:
                    report.empty.append(folder)
                for path in found:
                    mask = None
                    if not good:
                        stem = os.path.splitext(os.path.basename(path))[0]
                        mask = _find_mask(os.path.join(cdir, "ground_truth", sub), stem)
                        if mask is None:
                            report.problem(f"{path}: no mask in {os.path.join(cdir, 'ground_truth', sub)}")
                            continue
                    rel = os.path.normpath(os.path.relpath(path, root))
                    item_split = splits.get(rel, "unlisted") if splits is not None else split
                    items.append(ImageItem(
                        path=path, dataset=dataset, object_type=obj, split=item_split,
                        defect=None if good or sub.lower() in UNKNOWN_TYPE_DIRS else sub,
                        is_anomalous=not good, mask_path=mask, rel=rel,
                        description=_description(root, path, obj, split, sub, report)))
                    if item_split == "unlisted":
                        report.unlisted.append(rel)
    used = {os.path.abspath(it.mask_path) for it in items if it.mask_path}
    report.stray_masks += [p for cdir in classes for p in _masks(cdir) if p not in used]
    if splits is not None:  # a listed image that is not there (before: dropped without a word)
        found = {os.path.normpath(os.path.relpath(it.path, root)) for it in items}
        for p in splits:  # there, but no image of the dataset: a mask, a folder, another file
            full = os.path.join(root, p)
            if p in found or not os.path.lexists(full):
                continue
            what = ("a folder" if os.path.isdir(full) else
                    "a mask" if "ground_truth" in p.split(os.sep) else
                    "not an image" if not p.lower().endswith(IMAGE_EXTS) else None)
            if what:  # (an image the scan skipped was said when it was skipped)
                report.problem(f"{os.path.join(root, 'splits.json')}: lists {p} ({splits[p]}), "
                               f"which is {what}, not one of the dataset's images")
        listed = [p for p in splits if p not in found and not os.path.lexists(os.path.join(root, p))]
        nfc = {unicodedata.normalize("NFC", f): f for f in found}
        for p in listed[:1] if report.policy == "error" else listed:
            twin = nfc.get(unicodedata.normalize("NFC", p))  # the same name, other bytes
            closed = _closed_folder(root, p)
            report.problem(f"{os.path.join(root, 'splits.json')}: lists {p} ({splits[p]}), "
                           + (f"which cannot be reached: {closed} cannot be read (permission "
                              "denied)" if closed else "which does not exist")
                           + (f" ({len(listed)} such)" if len(listed) > 1 else "")
                           + (f"; {twin} differs from it only in Unicode normalisation (NFD "
                              "against NFC): rename so they match byte for byte" if twin else ""))
    return items


def _closed_folder(root: str, rel: str) -> str | None:
    """The first folder on the way from ``root`` to ``root/rel`` that exists but this process
    may not list or enter (before: its images were said not to exist), or None."""
    folder = root
    for part in os.path.dirname(rel).split(os.sep):
        if not part:
            continue
        folder = os.path.join(folder, part)
        if not os.path.isdir(folder):
            return None
        if not os.access(folder, os.R_OK | os.X_OK):
            return folder
    return None


def iter_classes(items: list[ImageItem]) -> Iterator[tuple[str, list[ImageItem]]]:
    by: dict[str, list[ImageItem]] = {}
    for it in items:
        by.setdefault(it.object_type, []).append(it)
    yield from sorted(by.items())
