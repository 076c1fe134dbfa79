"""A random but plausible trunk: the subject every phantom scan images.

Coordinates are patient LPS millimetres (x towards the patient's left, y posterior, z superior) with the
trunk's axis at x = y = 0 and z = 0 near the first lumbar vertebra. The body is child-sized (about
210 × 165 mm across) so a 150–250 mm field of view holds it, as the collection's size budget needs.

Each *concept* has a characteristic shape, place and tissue, shared by every dataset that labels it:
the liver is a wedge under the right dome of the diaphragm, the kidneys are beans beside the spine with a
carved hilum, the aorta a tube in front of the spine, the diaphragm a 2.5–3 mm sheet, the adrenals a few
millimetres thin, tumours nest inside their organ. Everything is also drawn when no dataset labels it,
because real scans show the whole body and only some structures are annotated: a novel class like the
sacrum is visible, unlabelled, in training scans of the pelvis, exactly the situation in-context models
face. Per subject, every concept's position, size, orientation and outline are drawn at random, and the
whole body is scaled, rotated and shifted in the scanner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from iris_pipelines.phantoms.raster import Structure, SubjectFrame
from iris_pipelines.phantoms.shapes import (
    Blob,
    EllipticCylinder,
    HalfSpace,
    Intersect,
    Offset,
    RadialWaves,
    Shape,
    Shell,
    Subtract,
    Tube,
    rotation,
)

# Concepts a dataset can label. Several datasets label the same concept under the same name, which is
# what lets a model learn "liver" from one scanner and find it with another.
CONCEPTS = (
    "liver", "liver_tumour", "spleen", "kidney_left", "kidney_right", "kidney_tumour", "adrenal_left",
    "adrenal_right", "gallbladder", "pancreas", "pancreas_tumour", "aorta", "ivc", "diaphragm", "spine",
    "sacrum", "hip_left", "hip_right", "bladder", "rectum", "prostate", "lesion",
)  # fmt: skip
# Pathology: drawn in every subject of a dataset that labels it and, as incidental findings, in a quarter
# of the subjects elsewhere (labelled there as their organ, or not at all).
PATHOLOGY = ("liver_tumour", "kidney_tumour", "pancreas_tumour")
INCIDENTAL_RATE = 0.25


def _blob(
    rng: np.random.Generator,
    centre: Iterable[float],
    semi: Iterable[float],
    *,
    angles: Iterable[float] = (0.0, 0.0, 0.0),
    jitter_mm: float = 5.0,
    size_sd: float = 0.08,
    angle_sd: float = 6.0,
    wobble: float = 0.05,
    taper: float = 0.0,
) -> Blob:
    """A concept's blob with this subject's random position, size, orientation and outline."""
    centre = np.asarray(centre, dtype=float) + rng.normal(0.0, jitter_mm, 3)
    semi = np.asarray(semi, dtype=float) * np.clip(rng.normal(1.0, size_sd, 3), 0.7, 1.3)
    rot = rotation(*(np.asarray(angles, dtype=float) + rng.normal(0.0, angle_sd, 3)))
    return Blob(centre, semi, rot, RadialWaves.random(rng, wobble), taper)


def _tube(rng: np.random.Generator, controls: list[tuple[float, float, float]], radii: list[float]) -> Tube:
    """A concept's tube: control points wander a few mm and the calibre varies by ~10% per subject."""
    points = np.asarray(controls, dtype=float) + rng.normal(0.0, 3.0, (len(controls), 3))
    return Tube.through(points, np.asarray(radii) * rng.uniform(0.9, 1.1))


def _parts(shape: Shape) -> tuple[Shape, ...]:
    """Tubes are painted piece by piece (tight boxes); other shapes whole."""
    return shape.pieces() if isinstance(shape, Tube) else (shape,)


def _point_inside(rng: np.random.Generator, shape: Shape, depth_mm: tuple[float, float]) -> np.ndarray:
    """A random point whose field lies in ``-depth_mm[1] .. -depth_mm[0]`` (inside, at that depth)."""
    lo, hi = shape.bounds()
    for _ in range(20):
        candidates = rng.uniform(lo, hi, size=(512, 3))
        values = shape.field(candidates.T.astype(np.float32))
        good = np.flatnonzero((values <= -depth_mm[0]) & (values >= -depth_mm[1]))
        if good.size:
            return candidates[good[0]]
    raise RuntimeError("could not place a lesion inside its organ; the organ is too small for it")


def _trunk(rng: np.random.Generator) -> tuple[list[Structure], Blob, float]:
    """Body wall, thorax and bowel: what every scan shows around the labelled organs."""
    semi = np.array([105.0, 82.0]) * rng.uniform(0.93, 1.07, 2)

    def layer(inset: float) -> EllipticCylinder:
        orders = np.array([2, 3, 4])
        return EllipticCylinder(
            np.zeros(2), semi - inset, orders, rng.normal(0.0, 0.015, 3), rng.uniform(0, 2 * np.pi, 3)
        )

    body, wall, cavity = layer(0.0), layer(rng.uniform(8.0, 12.0)), layer(rng.uniform(18.0, 22.0))
    # The diaphragm is the top cap of this dome; organs below it are clipped to its inside.
    dome = _blob(
        rng, (0.0, 8.0, 40.0), (84.0, 62.0, 62.0), angles=(0.0, -5.0, 0.0), size_sd=0.04, wobble=0.02
    )
    thickness = float(rng.uniform(2.5, 3.0))
    above = HalfSpace(np.array([0.0, 0.0, 60.0]), np.array([0.0, 0.0, -1.0]))
    lungs = [
        Structure(
            "lung",
            "lung",
            (
                Subtract(
                    Intersect(
                        (
                            above,
                            HalfSpace(np.array([side * 14.0, 0, 0]), np.array([-side, 0, 0])),
                            Offset(cavity, -3.0),
                        )
                    ),
                    Offset(dome, thickness),
                ),
            ),
        )
        for side in (1.0, -1.0)
    ]
    heart = _blob(rng, (12.0, -12.0, 150.0), (40.0, 36.0, 38.0), angles=(0.0, 20.0, 30.0))
    cap = HalfSpace(np.array([0.0, 0.0, 62.0]), np.array([0.0, 0.0, -1.0]))
    diaphragm = Intersect((cap, Shell(dome, thickness), cavity))
    bowel = [
        Structure("bowel", "bowel", (Intersect((_blob(rng, c, (r, r, r), wobble=0.1), cavity)),))
        for c, r in zip(
            rng.uniform((-60, -50, -70), (60, 20, 30), size=(6, 3)), rng.uniform(12, 22, 6), strict=True
        )
    ]
    gas = [
        Structure("bowel_gas", "bowel_gas", (Intersect((_blob(rng, c, (r, r, r), wobble=0.1), cavity)),))
        for c, r in zip(
            rng.uniform((-60, -50, -70), (60, 20, 30), size=(8, 3)), rng.uniform(4, 10, 8), strict=True
        )
    ]
    structures = [
        Structure("body", "fat", (body,)),
        Structure("body_wall", "muscle", (wall,)),
        Structure("cavity", "cavity", (cavity,)),
        *lungs,
        Structure("heart", "heart", (heart,)),
        Structure("diaphragm", "diaphragm", (diaphragm,)),
        *bowel,
        *gas,
    ]
    return structures, dome, thickness


def _organs(rng: np.random.Generator, under_dome: Shape) -> tuple[list[Structure], dict[str, Shape], Tube]:
    """Solid and hollow organs plus the tubes (vessels, rectum) that run between and through them."""
    liver = Intersect((_blob(rng, (-42, 2, 62), (50, 48, 40), angles=(0, 0, 10), taper=-0.45), under_dome))
    spleen = Intersect((_blob(rng, (58, 30, 60), (17, 28, 32), angles=(0, 0, -30)), under_dome))
    kidneys: dict[str, Shape] = {}
    adrenals: dict[str, Shape] = {}
    for side, name in ((1.0, "left"), (-1.0, "right")):
        centre = np.array([47.0 * side, 40.0, 16.0 if side > 0 else 6.0]) + rng.normal(0.0, 4.0, 3)
        bean = _blob(rng, centre, (14, 12, 26), angles=(0, -12 * side, 25 * side), jitter_mm=0.0)
        hilum = Blob(centre + bean.rot @ np.array([-13.0 * side, -4.0, 0.0]), np.array([7.0, 6.0, 10.0]))
        kidneys[f"kidney_{name}"] = Subtract(bean, hilum)
        adrenals[f"adrenal_{name}"] = _blob(
            rng,
            centre + (-8 * side, -3, 30),
            (3.5, 8, 10),
            angles=(0, 0, 30 * side),
            jitter_mm=2.0,
            size_sd=0.1,
        )
    gallbladder = _blob(rng, (-30, -28, 42), (10, 11, 20), angles=(25, 0, 0))
    pancreas = _tube(
        rng, [(-30, -8, 22), (-12, -4, 26), (10, -2, 30), (32, 10, 36), (48, 22, 42)], [11, 9, 8, 7, 6]
    )
    bladder = _blob(rng, (0, -32, -100), np.array([30, 24, 22]) * rng.uniform(0.75, 1.2))
    prostate = _blob(rng, (0, -15, -132), (14, 11, 12), jitter_mm=3.0)
    rectum = _tube(
        rng, [(0, 48, -150), (0, 45, -125), (-3, 38, -100), (8, 28, -75), (20, 15, -60)], [11, 11, 10, 10, 9]
    )
    aorta = _tube(
        rng, [(4, 18, 160), (6, 21, 100), (7, 21, 40), (5, 19, -20), (2, 16, -65)], [8, 8, 7.5, 7, 6.5]
    )
    iliacs = [
        _tube(rng, [(2, 16, -65), (side * 20, 14, -85), (side * 38, 10, -112)], [6, 5.5, 5])
        for side in (1, -1)
    ]
    ivc = _tube(rng, [(-17, 24, 105), (-17, 24, 60), (-15, 23, 0), (-10, 20, -62)], [8, 8.5, 8, 7.5])
    shapes: dict[str, Shape] = {
        "liver": liver,
        "gallbladder": gallbladder,
        "spleen": spleen,
        **kidneys,
        **adrenals,
        "pancreas": pancreas,
        "bladder": bladder,
        "prostate": prostate,
        "rectum": rectum,
    }
    tissues = {
        "kidney_left": "kidney",
        "kidney_right": "kidney",
        "adrenal_left": "adrenal",
        "adrenal_right": "adrenal",
    }
    structures = [Structure(name, tissues.get(name, name), _parts(shape)) for name, shape in shapes.items()]
    structures += [
        Structure("aorta", "aorta", aorta.pieces()),
        Structure("iliac_artery", "aorta", tuple(piece for tube in iliacs for piece in tube.pieces())),
        Structure("ivc", "ivc", ivc.pieces()),
    ]
    return structures, shapes, pancreas


def _bones(rng: np.random.Generator) -> list[Structure]:
    """Vertebrae, sacrum and hip bones, each with a cortical rim over cancellous bone."""
    cortex = float(rng.uniform(2.0, 3.0))
    vertebrae: list[Shape] = []
    for level in range(8):
        z = -52.0 + 28.0 * level
        vertebrae += [
            _blob(rng, (0, 45, z), (16, 13, 10.5), jitter_mm=1.0, wobble=0.03, angle_sd=3.0),
            _blob(rng, (0, 66, z), (7, 11, 9), jitter_mm=1.0, wobble=0.03, angle_sd=3.0),
            _blob(rng, (0, 58, z), (24, 5, 5), jitter_mm=1.0, wobble=0.03, angle_sd=3.0),
        ]
    sacrum = _blob(rng, (0, 72, -95), (30, 11, 30), angles=(0, 90, 0), taper=-0.5, jitter_mm=3.0, wobble=0.03)
    structures = [
        Structure("spine", "bone", tuple(vertebrae), cortex_mm=cortex),
        Structure("sacrum", "bone", (sacrum,), cortex_mm=cortex),
    ]
    for side, name in ((1.0, "hip_left"), (-1.0, "hip_right")):
        ilium = _blob(
            rng, (70 * side, 38, -85), (9, 36, 30), angles=(10, 0, 35 * side), jitter_mm=3.0, wobble=0.04
        )
        acetabulum = _blob(rng, (76 * side, 4, -128), (18, 18, 16), jitter_mm=3.0, wobble=0.03)
        pubis = _tube(rng, [(70 * side, 0, -130), (40 * side, -28, -140), (8 * side, -40, -140)], [7, 6.5, 6])
        ischium = _tube(rng, [(76 * side, 10, -132), (66 * side, 22, -152)], [8, 7])
        parts = (ilium, acetabulum, *pubis.pieces(), *ischium.pieces())
        structures.append(Structure(name, "bone", parts, cortex_mm=cortex))
    return structures


def _pathology(
    rng: np.random.Generator, wanted: set[str], organs: dict[str, Shape], pancreas: Tube
) -> list[Structure]:
    """Tumours in their organs, painted last and only over their organ's voxels (see :func:`.raster.paint`),
    so their label overrides the organ's and never a neighbour's."""
    structures: list[Structure] = []
    for concept in PATHOLOGY:
        present = concept in wanted or rng.uniform() < INCIDENTAL_RATE
        if not present:
            continue
        if concept == "liver_tumour":
            for _ in range(int(rng.integers(1, 4))):
                radius = float(rng.uniform(6.0, 14.0))
                centre = _point_inside(rng, organs["liver"], (radius + 3.0, radius + 25.0))
                structures.append(
                    Structure(concept, concept, (_tumour(rng, centre, radius),), parent="liver")
                )
        elif concept == "kidney_tumour":
            kidney = "kidney_left" if rng.uniform() < 0.5 else "kidney_right"
            radius = float(rng.uniform(8.0, 16.0))
            centre = _point_inside(rng, organs[kidney], (0.2 * radius, 0.6 * radius))
            structures.append(Structure(concept, concept, (_tumour(rng, centre, radius),), parent=kidney))
        else:
            index = int(rng.integers(len(pancreas.radii) // 10, 8 * len(pancreas.radii) // 10))
            radius = float(min(rng.uniform(5.0, 10.0), pancreas.radii[index] + 2.0))
            structures.append(
                Structure(
                    concept, concept, (_tumour(rng, pancreas.centreline[index], radius),), parent="pancreas"
                )
            )
    return structures


def _tumour(rng: np.random.Generator, centre: np.ndarray, radius: float) -> Blob:
    return Blob(
        np.asarray(centre, dtype=float),
        radius * rng.uniform(0.8, 1.2, 3),
        rotation(*rng.uniform(0, 360, 3)),
        RadialWaves.random(rng, 0.08),
    )


def _hot_lesions(rng: np.random.Generator, organs: dict[str, Shape]) -> list[Structure]:
    """1–4 FDG-avid lesions (liver, lung base, para-aortic nodes, vertebrae) for the PET-like datasets."""
    sites: list[Callable[[float], np.ndarray]] = [
        lambda r: _point_inside(rng, organs["liver"], (r + 2.0, r + 30.0)),
        lambda r: np.array([rng.choice([-50.0, 50.0]), rng.uniform(-10, 20), rng.uniform(112, 125)]),
        lambda r: np.array([rng.choice([-20.0, 25.0]), rng.uniform(20, 30), rng.uniform(-50, 40)]),
        lambda r: np.array([0.0, 45.0, -52.0 + 28.0 * int(rng.integers(0, 6))]),
    ]
    lesions = []
    for _ in range(int(rng.integers(1, 5))):
        radius = float(rng.uniform(5.0, 12.0))
        site = sites[int(rng.integers(0, len(sites)))]
        lesions.append(Structure("lesion", "lesion", (_tumour(rng, site(radius), radius),)))
    return lesions


def build_subject(rng: np.random.Generator, labelled: Iterable[str]) -> tuple[SubjectFrame, list[Structure]]:
    """One subject: its pose in the scanner and its structures in painting order.

    ``labelled`` names the concepts the subject's dataset annotates; it decides which pathology every
    subject carries (a tumour dataset's subjects all have tumours) and whether PET lesions are drawn.
    """
    wanted = set(labelled)
    unknown = wanted - set(CONCEPTS)
    if unknown:
        raise ValueError(f"unknown class concepts {sorted(unknown)}; known: {sorted(CONCEPTS)}")
    frame = SubjectFrame(
        scale=float(rng.uniform(0.92, 1.08)),
        rot=rotation(*rng.normal(0.0, 2.0, 3)),
        shift=rng.normal(0.0, 6.0, 3),
    )
    trunk, dome, thickness = _trunk(rng)
    under_dome = Offset(dome, -thickness / 2.0 - 0.5)
    organs, organ_shapes, pancreas = _organs(rng, under_dome)
    structures = trunk + organs + _bones(rng) + _pathology(rng, wanted, organ_shapes, pancreas)
    if "lesion" in wanted:
        structures += _hot_lesions(rng, organ_shapes)
    return frame, structures
