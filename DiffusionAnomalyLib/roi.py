"""Organ masks from TotalSegmentator: reading, carrying onto another grid, organ sets, ROI masks (no torch).

TotalSegmentator (Wasserthal et al., Radiol. Artif. Intell. 2023) segments the CT of a PET/CT
pair; its organs are carried onto the PET (or any other grid) by physical coordinates. Its
output comes in three forms, all read by :func:`read_organ_labels` into one :class:`OrganLabels`
(a label :class:`.volume.Volume` whose ids are those of TotalSegmentator's v2 ``total`` class
map, plus that id -> name map):

- one multi-label NIfTI (``TotalSegmentator --ml``): voxel value = class-map id;
- the folder of per-structure files ``<name>.nii.gz`` (TotalSegmentator's default output);
- a Slicer ``.seg.nrrd`` whose segments carry TotalSegmentator names, as the TotalSegmentator
  Slicer extension saves them (its segment IDs are the TotalSegmentator names even when the
  displayed names are "standard" ones such as "Right kidney", so the ID is accepted too).

The class map is TotalSegmentator's own (``totalsegmentator.map_to_binary.class_map["total"]``)
when TotalSegmentator is importable, else the copy shipped in
``resources/totalsegmentator_v2_total.csv``. ``--fast`` output uses the same map.

:meth:`OrganLabels.on_grid` carries labels onto a target grid (other spacing, field of view,
direction, axis order) with :func:`.volume.resample_to` (nearest neighbour, physical space).
:func:`organ_names` turns names and named groups (:data:`ORGAN_GROUPS`) into TotalSegmentator
names; :func:`roi_mask` builds the include-minus-exclude mask with a margin in millimetres.
Every refusal is a ``ValueError`` (:class:`.volume.VolumeError` for files and geometry) whose
message is one sentence saying what to do.
"""

from __future__ import annotations

import csv
import difflib
import functools
import io
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import slicerio
from scipy import ndimage as ndi

from .card import check_margin_mm, organ_list
from .postprocessing import bounding_box, voxel_volume_ml
from .volume import Volume, VolumeError, lps_ras_flip, read_volume, resample_to

__all__ = [
    "CLASS_MAP_TABLE",
    "ORGAN_GROUPS",
    "OrganLabels",
    "OrganSelection",
    "check_overlap",
    "class_map",
    "dilate_mm",
    "label_dtype",
    "organ_names",
    "read_organ_labels",
    "roi_mask",
    "segment_organ_name",
]

#: The shipped copy of TotalSegmentator's v2 ``total`` class map (Apache-2.0), inside the package.
CLASS_MAP_TABLE = "resources/totalsegmentator_v2_total.csv"
_TASK = "total"
_TASK_WORDS = "TotalSegmentator's v2 'total' class map"

_KIDNEYS = ("kidney_right", "kidney_left",
            # TotalSegmentator v2 carves renal cysts out of the kidney label: without them a kidney ROI has holes.
            "kidney_cyst_right", "kidney_cyst_left")

#: Named organ sets (TotalSegmentator v2 ``total`` names). Group names use hyphens, structure names underscores.
#:
#: ``physiological-uptake``: where FDG is intense in every normal scan, so a hot spot there is not
#: read as a lesion (EANM FDG PET/CT procedure guideline 2.0, Boellaard et al. 2015; Shreve et al.,
#: RadioGraphics 1999, "Pitfalls in oncologic diagnosis with FDG PET imaging"):
#:
#: - brain: glucose is the brain's only fuel; grey matter is the hottest normal tissue (SUV 6-12).
#: - heart: myocardium uses glucose after a meal and fasting suppresses it only in part; often intense.
#: - kidneys (with their cysts): FDG is filtered and not reabsorbed, so the collecting systems hold excreted tracer.
#: - urinary_bladder: excreted FDG collects in urine; usually the hottest structure of the scan.
#:
#: Left out, decided from the v2 ``total`` table: ureters (urine activity) and the salivary glands,
#: tonsils and vocal cords (lymphoid/secretory uptake) are not ``total`` classes, so no mask exists
#: for them (a margin around the kidneys and bladder covers the ends of the ureters only); liver,
#: spleen and bone marrow take up FDG moderately (the liver is the reference background) and are
#: frequent metastasis sites; stomach and bowel uptake is variable and focal (peristalsis,
#: metformin) but bowel cancer and peritoneal disease lie there, so they are the opt-in ``bowel``
#: group; thyroid uptake is normally low and focal uptake is a finding to report; muscle and brown
#: fat vary with exercise and cold (brown fat is no ``total`` class either).
ORGAN_GROUPS: dict[str, tuple[str, ...]] = {
    "physiological-uptake": ("brain", "heart", *_KIDNEYS, "urinary_bladder"),
    "kidneys": _KIDNEYS,
    "urinary-tract": (*_KIDNEYS, "urinary_bladder"),
    "bowel": ("duodenum", "small_bowel", "colon"),
    "lungs": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right"),
}

#: up to this many organs :meth:`OrganLabels.mask` compares the ids one by one (beyond, ``np.isin`` is faster)
_FEW_ORGANS = 6

_LABEL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr")
_SEGMENTATION_HINT = ("give TotalSegmentator's multi-label file (--ml), the folder of its per-structure "
                      "<name>.nii.gz files, or a Slicer .seg.nrrd with TotalSegmentator segment names")


# =============================================================================================
# Class map
# =============================================================================================
def class_map() -> dict[int, str]:
    """TotalSegmentator's v2 ``total`` class map, id -> name: its own when importable, the shipped table otherwise."""
    try:
        from totalsegmentator.map_to_binary import class_map as totalsegmentator_maps
    except ImportError:  # TotalSegmentator lives in its own environment, usually not this one
        return dict(_shipped_class_map())
    return {int(k): str(v) for k, v in totalsegmentator_maps[_TASK].items()}


@functools.lru_cache(maxsize=1)
def _shipped_class_map() -> dict[int, str]:
    text = (resources.files(__package__) / CLASS_MAP_TABLE).read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    return {int(row["id"]): row["name"] for row in rows}


def _key(name: str) -> str:
    """Spelling-insensitive form of an organ or group name ("Kidney Left", "kidney-left" -> "kidney_left")."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in _LABEL_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


# =============================================================================================
# Organ labels
# =============================================================================================
@dataclass
class OrganLabels:
    """A label volume with TotalSegmentator ids (0 = background) and the id -> name map it uses.

    ``source`` names where the labels came from (for messages); ``ignored`` lists structures of
    the source that are not in the class map (files or segments of other tasks), left out.
    """

    volume: Volume
    names: dict[int, str]
    source: str = ""
    ignored: tuple[str, ...] = field(default_factory=tuple)
    _carried: dict = field(default_factory=dict, repr=False, compare=False)  # grid -> labels on it (on_grid)

    @property
    def ids(self) -> dict[str, int]:
        """Name -> id for every structure of the class map."""
        return {name: i for i, name in self.names.items()}

    def voxel_counts(self) -> dict[str, int]:
        """Name -> voxel count of the structures present (non-empty), in id order."""
        counts = np.bincount(self.volume.voxels.ravel().astype(np.int64, copy=False))
        return {self.names[i]: int(n) for i, n in enumerate(counts) if i and n and i in self.names}

    @property
    def present(self) -> tuple[str, ...]:
        """Names of the structures with at least one voxel, in id order."""
        return tuple(self.voxel_counts())

    def volumes_ml(self) -> dict[str, float]:
        """Name -> volume in ml of the structures present (voxel count x voxel volume)."""
        ml = voxel_volume_ml(self.volume.ijk_to_ras)
        return {name: n * ml for name, n in self.voxel_counts().items()}

    def mask(self, organs: str | Iterable[str]) -> np.ndarray:
        """Boolean ``[k, j, i]`` mask of the given organs (names and groups, as :func:`organ_names` takes them).

        ``np.isin``'s mask; for a few organs one comparison per id, which is several times faster on a
        whole-body grid (one organ: 30x)."""
        ids = self.ids
        wanted = [ids[n] for n in organ_names(organs, self.names.values())]
        voxels = self.volume.voxels
        if not wanted or len(wanted) > _FEW_ORGANS:
            return np.isin(voxels, wanted)
        out = voxels == wanted[0]
        for i in wanted[1:]:
            out |= voxels == i
        return out

    def on_grid(self, grid: Volume) -> "OrganLabels":
        """These labels on ``grid`` (its spacing, extent, direction and axis order), by physical coordinates.

        Nearest neighbour (:func:`.volume.resample_to`), so every voxel of the result holds one
        TotalSegmentator id; grid points outside the segmentation get 0. Refused when no labelled
        voxel lands on the grid (a segmentation of another patient, study or frame of reference).
        """
        if self.volume.same_geometry(grid):
            return self
        key = (grid.voxels.shape[:3], grid.ijk_to_ras.tobytes())
        if key not in self._carried:  # the ROI and the region of one run ask for the same grid
            check_overlap(self.volume, grid, _segmentation_words(self))
            carried = resample_to(self.volume, grid, "nearest")
            if not carried.voxels.any():
                raise VolumeError(_no_overlap_sentence(self.volume, grid, _segmentation_words(self)))
            self._carried.clear()  # one grid kept: a whole-body label map per grid is large
            self._carried[key] = OrganLabels(volume=carried, names=dict(self.names), source=self.source,
                                             ignored=self.ignored)
        return self._carried[key]


def _box_words(box: np.ndarray) -> str:
    return ", ".join(f"{axis} {lo:.0f} to {hi:.0f}" for axis, lo, hi in zip("RAS", box[0], box[1]))


def _no_overlap_sentence(volume: Volume, grid: Volume, what: str) -> str:
    return (f"{what} does not overlap the input volume (it covers {_box_words(volume.ras_box())} mm, "
            f"the input {_box_words(grid.ras_box())} mm RAS); give the segmentation of this patient's CT from the "
            "same study, whose frame of reference the input shares.")


def _segmentation_words(labels: OrganLabels) -> str:
    return f"the organ segmentation{' ' + labels.source if labels.source else ''}"


def check_overlap(volume: Volume, grid: Volume, what: str = "the organ segmentation") -> None:
    """Refuse ``volume`` (a segmentation, or the CT it will come from) whose RAS box misses ``grid``'s.

    Cheap (voxel corners only), so ``run --ct`` refuses a CT of another study before TotalSegmentator runs.
    """
    a, b = volume.ras_box(), grid.ras_box()
    if np.any(a[1] < b[0]) or np.any(b[1] < a[0]):
        raise VolumeError(_no_overlap_sentence(volume, grid, what))


# =============================================================================================
# Reading
# =============================================================================================
def read_organ_labels(path: str | Path, *, names: Mapping[int, str] | None = None) -> OrganLabels:
    """Read a TotalSegmentator output: multi-label file, per-structure folder or Slicer ``.seg.nrrd``.

    ``names`` overrides the class map (id -> TotalSegmentator name; default :func:`class_map`).
    A single file named after one structure (``kidney_left.nii.gz``) holding only 0 and 1 is
    that structure (one file of the per-structure output), not id 1 of the class map.
    """
    path = Path(path).expanduser()
    names = dict(class_map() if names is None else names)
    if not path.exists():
        raise VolumeError(f"organ segmentation not found: {path}; {_SEGMENTATION_HINT}.")
    if path.is_dir():
        return _read_folder(path, names)
    if path.name.lower().endswith((".nrrd", ".nhdr")) and _is_slicer_segmentation(path):
        return _read_seg_nrrd(path, names)
    return _read_label_file(path, names)


def _read_labels_volume(path: Path) -> Volume:
    """A label file as a Volume of non-negative integers (float files must hold whole numbers)."""
    volume = read_volume(path, validate=False)
    voxels = volume.voxels
    if not (np.issubdtype(voxels.dtype, np.integer) or voxels.dtype == np.bool_):
        if not np.all(np.isfinite(voxels)) or not np.array_equal(voxels, np.round(voxels)):
            raise VolumeError(f"{path} is not a label map (its voxels are not whole numbers); {_SEGMENTATION_HINT}.")
        voxels = voxels.astype(np.int64)
    if voxels.size and voxels.min() < 0:
        raise VolumeError(f"{path} is not a label map (it holds negative values); {_SEGMENTATION_HINT}.")
    top = int(voxels.max()) if voxels.size else 0
    dtype = np.uint8 if top <= np.iinfo(np.uint8).max else np.uint16 if top <= np.iinfo(np.uint16).max else np.int64
    return volume.with_voxels(voxels.astype(dtype, copy=False), modality=None, units=None)


def _read_label_file(path: Path, names: dict[int, str]) -> OrganLabels:
    volume = _read_labels_volume(path)
    ids = _label_ids(volume.voxels)
    stem = _file_stem(path)
    if ids.size == 0:
        raise VolumeError(_empty_sentence(path))
    if stem in names.values() and set(ids.tolist()) <= {1}:  # one file of the per-structure output
        one = {v: k for k, v in names.items()}[stem]
        voxels = np.where(volume.voxels != 0, one, 0).astype(label_dtype(names))
        return OrganLabels(volume.with_voxels(voxels), names, str(path))
    unknown = sorted(set(ids.tolist()) - set(names))
    if unknown:
        shown = ", ".join(map(str, unknown[:8])) + (" ..." if len(unknown) > 8 else "")
        raise VolumeError(
            f"the label file {path} holds ids {shown} that {_TASK_WORDS} (ids {min(names)}-{max(names)}) does not "
            f"have, so it is not the multi-label output of TotalSegmentator's 'total' task; {_SEGMENTATION_HINT}.")
    return OrganLabels(volume, names, str(path))


#: voxels counted per ``np.bincount`` call in :func:`_label_ids` (it copies them as 8-byte integers: 8 MB at a time)
_COUNT_CHUNK = 1 << 20


def _label_ids(voxels: np.ndarray) -> np.ndarray:
    """The non-zero values of a label array, ascending (``np.unique`` without 0); for uint8 / uint16 (how
    :func:`_read_labels_volume` stores TotalSegmentator ids) from ``np.bincount`` counts, a chunk at a time so
    its integer copy stays in cache: ~2.5x faster than ``np.unique`` on a whole-body grid."""
    if voxels.dtype not in (np.uint8, np.uint16):
        ids = np.unique(voxels)
        return ids[ids != 0]
    flat = voxels.reshape(-1)
    counts = np.zeros(int(np.iinfo(voxels.dtype).max) + 1, dtype=np.int64)
    for start in range(0, flat.size, _COUNT_CHUNK):
        counts += np.bincount(flat[start:start + _COUNT_CHUNK], minlength=counts.size)
    return np.flatnonzero(counts[1:]) + 1


def _empty_sentence(source: str | Path) -> str:
    return f"the organ segmentation {source} is empty (no voxel is labelled); {_SEGMENTATION_HINT}."


def _nonempty(labels: OrganLabels) -> OrganLabels:
    if not labels.volume.voxels.any():
        raise VolumeError(_empty_sentence(labels.source))
    return labels


def label_dtype(names: Mapping[int, str]):
    """The smallest unsigned integer type holding every id of ``names`` (uint8, else uint16)."""
    return np.uint8 if max(names, default=0) <= np.iinfo(np.uint8).max else np.uint16


def _read_folder(folder: Path, names: dict[int, str]) -> OrganLabels:
    """The per-structure output: ``<name>.nii.gz`` per class (nonzero = inside), merged in id order.

    TotalSegmentator writes every file on its input's grid; a file on another grid is carried onto
    the first file's grid by physical coordinates. Structures never overlap in its output; if
    edited files do, the higher id wins.
    """
    by_name = {v: k for k, v in names.items()}
    files, ignored = {}, []
    for f in sorted(folder.iterdir()):
        if not f.is_file() or not f.name.lower().endswith((".nii.gz", ".nii")):
            continue
        stem = _file_stem(f)
        if stem in by_name:
            files[by_name[stem]] = f
        else:
            ignored.append(stem)
    if not files:
        found = f" (its NIfTI files: {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''})" if ignored else ""
        raise VolumeError(
            f"the folder {folder} holds no TotalSegmentator structure files{found}; expected <name>.nii.gz files named "
            f"after {_TASK_WORDS} (spleen.nii.gz, liver.nii.gz, ...) as TotalSegmentator writes them without --ml, "
            "or give its multi-label file instead.")
    reference, voxels = None, None
    for i in sorted(files):
        part = read_volume(files[i], validate=False)
        if reference is None:
            reference = part
            voxels = np.zeros(part.voxels.shape, dtype=label_dtype(names))
        elif not part.same_geometry(reference):
            part = resample_to(part, reference, "nearest")
        voxels[part.voxels != 0] = i
    return _nonempty(OrganLabels(reference.with_voxels(voxels, modality=None, units=None), names, str(folder),
                                 tuple(ignored)))


def _is_slicer_segmentation(path: Path) -> bool:
    """True when the NRRD header holds Slicer segment fields (``Segment0_ID`` ...), read by slicerio."""
    try:
        header = slicerio.read_segmentation(str(path), skip_voxels=True)
    except Exception:  # not a header slicerio understands: the volume reader gives the useful message
        return False
    return bool(header.get("segments"))


def segment_organ_name(name: str | None, segment_id: str | None, names: Iterable[str] | None = None) -> str | None:
    """A segment's TotalSegmentator name: from its name, else its ID (the Slicer extension's ID is the
    v2 name when its display name is a terminology name), spelling-insensitive; None if neither is one.

    ``names``: the class map's names (default :func:`class_map`).
    """
    by_key = {_key(n): n for n in (class_map().values() if names is None else names)}
    for candidate in (name, segment_id):
        if candidate is not None and _key(candidate) in by_key:
            return by_key[_key(candidate)]
    return None


def _read_seg_nrrd(path: Path, names: dict[int, str]) -> OrganLabels:
    """A Slicer segmentation file; segments overlapping in several layers: the higher id wins."""
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as exc:  # pynrrd/slicerio raise assorted types for unreadable files
        raise VolumeError(f"cannot read the Slicer segmentation {path}: {exc}; save it again from Slicer.") from None
    by_name = {v: k for k, v in names.items()}
    found, ignored = {}, []
    for segment in segmentation.get("segments", []):
        name = segment_organ_name(segment.get("name"), segment.get("id"), by_name)
        if name is None:
            ignored.append(str(segment.get("name", segment.get("id", "?"))))
        else:
            found.setdefault(by_name[name], []).append(segment)
    if not found:
        shown = ", ".join(ignored[:6]) + (" ..." if len(ignored) > 6 else "")
        raise VolumeError(
            f"none of the segments of {path} ({shown or 'no segments'}) has a name or ID from {_TASK_WORDS}; "
            "use the segmentation the TotalSegmentator extension made, or name the segments as TotalSegmentator does "
            "(spleen, kidney_left, ...).")
    spatial = segmentation["voxels"].shape[-3:]  # slicerio: [layer,] i, j, k
    voxels = np.zeros(spatial, dtype=label_dtype(names))
    for i in sorted(found):
        for segment in found[i]:
            voxels[slicerio.segment_mask(segmentation, segment)] = i
    volume = Volume(voxels=np.ascontiguousarray(voxels.transpose(2, 1, 0)),
                    ijk_to_ras=lps_ras_flip(np.asarray(segmentation["ijkToLPS"], dtype=np.float64)))
    return _nonempty(OrganLabels(volume, names, str(path), tuple(ignored)))


# =============================================================================================
# Organ sets and ROI masks
# =============================================================================================
def organ_names(spec: str | Iterable[str] | None, names: Iterable[str] | None = None) -> tuple[str, ...]:
    """TotalSegmentator names for ``spec``: names and/or groups, comma-separated text or a list.

    Spelling is forgiving ("Kidney Left", "kidney-left"); an unknown name is refused with the
    closest valid names, or the list of valid ones. ``names``: the class map's names (default
    :func:`class_map`). Order is kept, duplicates dropped; None or "" gives ().
    """
    if spec is None:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    valid = list(class_map().values() if names is None else names)
    lookup = {_key(n): (n,) for n in valid}
    lookup.update({_key(g): members for g, members in ORGAN_GROUPS.items()})
    out: list[str] = []
    for item in items:
        if not str(item).strip():
            continue
        members = lookup.get(_key(item))
        if members is None:
            raise ValueError(_unknown_organ_sentence(str(item).strip(), valid))
        out.extend(m for m in members if m not in out)
    return tuple(out)


def _unknown_organ_sentence(item: str, valid: list[str]) -> str:
    """One sentence: the closest names and groups when there are some, else every valid one."""
    choices = {_key(n): n for n in [*ORGAN_GROUPS, *valid]}
    close = difflib.get_close_matches(_key(item), list(choices), n=5, cutoff=0.6)
    groups = ", ".join(ORGAN_GROUPS)
    if close:
        return (f"unknown organ '{item}'; did you mean {' or '.join(choices[c] for c in close)}? "
                f"(groups: {groups}; names: TotalSegmentator's v2 'total' names such as kidney_left).")
    return f"unknown organ '{item}'; use a group ({groups}) or a TotalSegmentator v2 'total' name ({', '.join(valid)})."


def dilate_mm(mask: np.ndarray, spacing_ijk: Iterable[float], margin_mm: float) -> np.ndarray:
    """``mask`` (``[k, j, i]``) grown by ``margin_mm``: every voxel within that physical distance of it.

    Euclidean distance transform with the grid's spacing (``sampling``), so the margin is right
    on anisotropic grids, and on oblique (rotated) grids too, whose axes stay orthogonal. A
    sheared grid (gantry-tilted CT) is measured as if its axes were orthogonal; the margin is
    applied on the target (PET) grid, which scanners never shear. Only boxes around the mask's
    parts plus the margin are transformed (:func:`_separate_boxes`), so the brain, heart, kidneys
    and bladder of a whole-body grid cost their own boxes, not the body's; the result is the
    whole-grid transform's, voxel for voxel (each voxel's nearest mask voxel lies in a box whose
    margin reaches it, and a box only holds mask voxels).
    """
    mask = np.asarray(mask, dtype=bool)
    if margin_mm <= 0:
        return mask.copy()
    sampling = np.asarray(list(spacing_ijk), dtype=np.float64)[::-1]  # i, j, k -> k, j, i
    pad = np.ceil(margin_mm / sampling).astype(int) + 1
    out = np.zeros_like(mask)
    for box in _separate_boxes(mask, pad):  # pieces a margin's width apart: boxes overlap by at most one margin
        crop = tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(box, pad, mask.shape))
        distance = ndi.distance_transform_edt(~mask[crop], sampling=sampling)
        out[crop] |= distance <= margin_mm * (1.0 + 1e-9)  # a voxel exactly at the margin is inside, despite rounding
    return out


def _separate_boxes(mask: np.ndarray, gap: np.ndarray) -> list[tuple[slice, ...]]:
    """The boxes of ``mask``'s parts that empty slabs at least ``gap`` (per axis, voxels) thick separate: cut the
    box at such slabs of its projection on each axis, then each piece again, until none has one (so every
    connected part lies in one box, and specks nearer than the gap share one); none for an empty mask.

    Hand-written: labelling the whole grid (``ndimage.label`` + ``find_objects``) takes longer than the distance
    transforms it saves; these projections cost a few milliseconds.
    """
    first = bounding_box(mask)
    boxes, todo = [], [] if first is None else [first]
    while todo:
        box = todo.pop()
        inside = mask[box]
        for axis in range(mask.ndim):
            hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
            cuts = np.flatnonzero(np.diff(hits) > gap[axis])  # a slab of >= gap empty planes after hits[cut]
            if cuts.size:
                starts, stops = hits[np.r_[0, cuts + 1]], hits[np.r_[cuts, hits.size - 1]] + 1
                offset = box[axis].start
                for start, stop in zip(starts.tolist(), stops.tolist()):
                    piece = tuple(slice(offset + start, offset + stop) if a == axis else s for a, s in enumerate(box))
                    tight = bounding_box(mask[piece])  # the piece's own extent along the other axes
                    todo.append(tuple(slice(p.start + t.start, p.start + t.stop) for p, t in zip(piece, tight)))
                break
        else:
            boxes.append(box)
    return boxes


def _missing_sentence(items: list[str], where: str, labels: OrganLabels) -> str:
    which = ", ".join(items)
    verb = "is" if len(items) == 1 and _key(items[0]) not in {_key(g) for g in ORGAN_GROUPS} else "are"
    if where == "segmentation":
        them = "it" if verb == "is" else "them"
        return (f"{which} {verb} not in the organ segmentation {labels.source}: the scan does not show {them} or it "
                f"was segmented without {them}; leave {which} out of the included organs.")
    return (f"{which} {verb} outside the input volume's field of view; leave {which} out of the included organs, "
            "or give the scan that covers them.")


def roi_mask(labels: OrganLabels, include: str | Iterable[str] | None = None,
             exclude: str | Iterable[str] | None = None, margin_mm: float = 0.0, *,
             grid: Volume | None = None, skip_absent: bool = False) -> Volume:
    """The ROI on ``grid`` (default: the labels' own grid) as a uint8 Volume (1 = inside).

    ROI = (the ``include`` organs, or the whole grid when none are named) minus the ``exclude``
    organs, each grown by ``margin_mm`` (:func:`dilate_mm`: an included organ keeps the rim
    around it, an excluded one takes its rim with it, e.g. PET spill-over from kidneys and
    bladder). ``include``/``exclude``: names and groups as :func:`organ_names` takes them. The
    labels are carried onto ``grid`` by physical coordinates first (:meth:`OrganLabels.on_grid`).
    Refused: unknown names, an included organ (or group) absent from the segmentation or outside
    the grid, naming it (``skip_absent``: those are left out, as long as one is there), an empty
    ROI, a negative margin.
    """
    margin_mm = check_margin_mm(margin_mm)
    valid = tuple(labels.names.values())
    items = [str(item).strip() for item in (include.split(",") if isinstance(include, str) else include or ())]
    items = [item for item in items if item]
    include_names, exclude_names = organ_names(items, valid), organ_names(exclude, valid)
    on = labels if grid is None else labels.on_grid(grid)
    if include_names:
        present = set(labels.present)
        absent = [item for item in items if not present & set(organ_names(item, valid))]
        if absent and (not skip_absent or len(absent) == len(items)):
            raise ValueError(_missing_sentence(absent, "segmentation", labels))
        inside_grid = set(on.present)
        outside = [item for item in items if item not in absent and not inside_grid & set(organ_names(item, valid))]
        if outside and (not skip_absent or len(outside) + len(absent) == len(items)):
            raise ValueError(_missing_sentence(outside, "grid", labels))
    spacing = on.volume.spacing
    if include_names:
        inside = dilate_mm(on.mask(include_names), spacing, margin_mm)
    else:
        inside = np.ones(on.volume.voxels.shape, dtype=bool)
    if exclude_names:
        inside &= ~dilate_mm(on.mask(exclude_names), spacing, margin_mm)
    if not inside.any():
        raise ValueError(
            f"the organ ROI is empty: the excluded organs ({', '.join(exclude_names)}) cover "
            f"{'all of ' + ', '.join(include_names) if include_names else 'the whole input'}"
            f"{f' with the {margin_mm:g} mm margin' if margin_mm else ''}; exclude fewer organs or include others.")
    return on.volume.with_voxels(inside.astype(np.uint8), modality=None, units=None)


@dataclass(frozen=True)
class OrganSelection:
    """Which organs a run looks at: included organs (none: the whole volume), excluded organs, margin.

    The one record of an organ ROI choice, shared by the CLI, evaluation, the Slicer module and the
    outputs; :meth:`from_card` fills what the user left open from the model card's defaults
    (``inference_defaults.organ_exclude`` and ``organ_margin_mm``). Names are checked when a mask
    is built, against the segmentation's class map.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    margin_mm: float = 0.0
    #: included organs absent from a scan are left out instead of refused (the organs of a crop model's card, which
    #: the user did not name; an organ the user names must be there)
    skip_absent: bool = False

    @classmethod
    def from_card(cls, card: Mapping, include=None, exclude=None, margin_mm=None) -> "OrganSelection":
        """The card's default exclusion and margin, with each argument that is not None applied.

        ``exclude="none"`` (or "") switches the card's default exclusion off. A model working on organ
        crops (``preprocessing.crop``) includes its organs by default, those the scan shows.
        """
        d = card.get("inference_defaults", {}) or {}
        crop = (card.get("preprocessing", {}) or {}).get("crop")
        default = crop is not None and include in (None, "") and not organ_list(include)
        return cls(include=tuple(organ_list(crop["organs"] if default else include, "the included organs")),
                   exclude=tuple(organ_list(d.get("organ_exclude") if exclude is None else exclude,
                                            "the excluded organs")),
                   margin_mm=check_margin_mm(d.get("organ_margin_mm", 0.0) if margin_mm is None else margin_mm),
                   skip_absent=default)

    @property
    def restricts(self) -> bool:
        """True when organs are included: the method then only needs the region around them."""
        return bool(self.include)

    @property
    def is_whole_volume(self) -> bool:
        return not self.include and not self.exclude

    def mask(self, labels: OrganLabels, grid: Volume | None = None) -> Volume:
        """The ROI of this selection on ``grid`` (:func:`roi_mask`)."""
        return roi_mask(labels, self.include, self.exclude, self.margin_mm, grid=grid, skip_absent=self.skip_absent)

    def region_mask(self, labels: OrganLabels, grid: Volume | None = None) -> Volume | None:
        """What the method must compute: the included organs with their margin, before any exclusion
        (so changing the exclusion never needs a new run); None when no organ is included."""
        if not self.include:
            return None
        return roi_mask(labels, self.include, None, self.margin_mm, grid=grid, skip_absent=self.skip_absent)

    def masks(self, labels: OrganLabels, grid: Volume) -> tuple[np.ndarray, np.ndarray | None]:
        """The voxels of :meth:`mask` and :meth:`region_mask` on ``grid`` (the region None without included organs):
        what a run keeps lesions in, and what its method computes."""
        region = self.region_mask(labels, grid=grid)
        return self.mask(labels, grid=grid).voxels, None if region is None else region.voxels

    def words(self) -> str:
        """'the whole volume excluding physiological-uptake (5 mm margin)': the choice as a reader says it."""
        words = f"the organs {', '.join(self.include)}" if self.include else "the whole volume"
        if self.skip_absent:
            words += " (those the scan shows)"
        if self.exclude:
            words += f" excluding {', '.join(self.exclude)}"
        if self.margin_mm and (self.include or self.exclude):
            words += f" ({self.margin_mm:g} mm margin)"
        return words

    def as_parameters(self) -> dict:
        """The parameter record written into summaries, reports and evaluation results."""
        return {"roi_include": list(self.include), "roi_exclude": list(self.exclude), "roi_margin_mm": self.margin_mm}
