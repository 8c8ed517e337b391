"""Procedural frontal (PA) chest X-ray phantoms, written in the NIH ChestX-ray14 release layout.

An image is rendered as an attenuation map (soft tissue, air in the lungs and trachea, bone, heart) turned into
film brightness by ``1 - exp(-mu * A)``, the way a radiograph forms. Image right is the patient's left: the heart
bulges to the image right, the aortic knob and the gastric bubble sit there, and the right hemidiaphragm (image
left) is higher. A synthetic patient's anatomy is drawn once; every film of them (follow-ups too) is positioned,
exposed and processed anew, and may carry markers, electrodes or a catheter, as films in a hospital archive do.
Findings (nodule, effusion, cardiomegaly) are drawn into the anatomy and recorded as NIH labels.

Version 2 set its grey levels and ranges of variation by comparing raw phantoms with the training patients of the
NIH study (random-feature FD with networks other than the evaluation's, never the evaluation patients); see
docs/results.md.

Coordinates: ``x`` horizontal, 0 at the image centre, ±0.5 at the edges; ``y`` vertical, 0 at the top, 1 at the
bottom. Every edge is a smooth step a pixel wide, which antialiases the rendering at any size.

The module is about 500 lines because the anatomy, the acquisition and the release layout form one renderer whose
parts share the coordinate system and the random draws of a patient; split, each part would need the others.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from medsyngan.data.prepared import format_labels

PHANTOM_VERSION = 2
NIH_CSV_NAME = "Data_Entry_2017_v2020.csv"
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
FINDING_RATES = {"Nodule": 0.12, "Effusion": 0.12, "Cardiomegaly": 0.12}


@dataclass
class Anatomy:
    """Everything fixed for one synthetic patient."""

    body_w: float          # half-width of the torso
    shoulder_y: float      # height of the shoulder line
    neck_w: float          # half-width of the neck
    apex_y: float          # lung apices
    dia_y: float           # top of the right hemidiaphragm dome
    dia_left_drop: float   # how much lower the left hemidiaphragm sits
    lung_w: float          # lateral extent of the lungs
    med_w: float           # half-width of the upper mediastinum
    heart_cx: float
    heart_cy: float
    heart_a: float         # heart semi-axes (x, y)
    heart_b: float
    rib_y0: float          # first posterior rib at the spine
    rib_gap: float         # spacing between posterior ribs
    rib_w: float           # rib thickness
    vessels: np.ndarray    # (K, 5): side, angle, length, width, strength of the vascular branches
    soft: float = 1.0      # soft-tissue density (habitus): a heavy patient's film is whiter everywhere
    lung_air: float = 0.3  # how far aerated lung lowers attenuation (hyperinflated: darker lungs)
    rib_density: float = 0.07
    breast: float = 0.0    # strength of the breast shadows over the lower zones (0: none)
    arms_down: bool = True  # arms along the sides, in the field; otherwise raised out of it
    nodule: tuple[float, float, float] | None = None  # x, y, radius
    effusion: tuple[int, float] | None = None         # side (+1 image right), fluid height
    findings: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class Shot:
    """One exposure: positioning, technique, processing and what lies on the patient that day."""

    angle: float
    shift: tuple[float, float]
    zoom: float
    inspiration: float     # diaphragm moves down with a deeper breath
    mu: float              # exposure: attenuation → brightness
    gamma: float
    noise: float
    noise_seed: int
    ap: bool = False       # portable antero-posterior film: magnified heart, blurrier, more leads and lines
    contrast: float = 1.0  # display window: slope and offset applied to the film
    level: float = 0.0
    blur: float = 0.0      # Gaussian blur sigma as a fraction of the image side (focal spot, motion, scatter)
    shutters: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # collimated (dark) margins: l, r, t, b
    marker: tuple[float, float, float] | None = None  # burned-in side marker: x, y, letter height
    leads: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # ECG electrodes x, y
    line: tuple[float, float, float] | None = None    # a catheter from the neck: end x, end y, bow


def sample_anatomy(rng: np.random.Generator, findings_rate: dict[str, float] | None = None,
                   female: bool = False) -> Anatomy:
    rates = FINDING_RATES if findings_rate is None else findings_rate
    findings = tuple(sorted(name for name, p in rates.items() if rng.random() < p))
    heart_a = rng.uniform(0.135, 0.175) * (1.35 if "Cardiomegaly" in findings else 1.0)
    lung_w = rng.uniform(0.31, 0.39)
    k = 14
    vessels = np.stack(
        [
            np.repeat([-1.0, 1.0], k // 2),
            rng.uniform(-1.3, 1.5, k),        # angle from the horizontal, pointing away from the midline
            rng.uniform(0.09, 0.2, k),
            rng.uniform(0.004, 0.008, k),
            rng.uniform(0.05, 0.12, k),
        ],
        axis=1,
    )
    anatomy = Anatomy(
        body_w=rng.uniform(0.45, 0.56),
        shoulder_y=rng.uniform(0.03, 0.1),
        neck_w=rng.uniform(0.08, 0.12),
        apex_y=rng.uniform(0.09, 0.16),
        dia_y=rng.uniform(0.64, 0.78),
        dia_left_drop=rng.uniform(0.01, 0.045),
        lung_w=lung_w,
        med_w=rng.uniform(0.055, 0.075),
        heart_cx=rng.uniform(0.02, 0.06),
        heart_cy=0.0,
        heart_a=heart_a,
        heart_b=rng.uniform(0.09, 0.115),
        rib_y0=rng.uniform(0.1, 0.13),
        rib_gap=rng.uniform(0.056, 0.068),
        rib_w=rng.uniform(0.018, 0.026),
        vessels=vessels,
        soft=rng.uniform(0.8, 1.35),
        lung_air=rng.uniform(0.25, 0.38),
        rib_density=rng.uniform(0.045, 0.085),
        breast=rng.uniform(0.03, 0.1) if female else 0.0,
        arms_down=bool(rng.random() < 0.5),
        findings=findings,
    )
    # The heart rests on the diaphragm: its lower third always sinks below the dome.
    anatomy.heart_cy = anatomy.dia_y - rng.uniform(0.07, 0.09)
    if "Nodule" in findings:
        side = rng.choice([-1.0, 1.0])
        anatomy.nodule = (side * rng.uniform(0.14, lung_w - 0.07), rng.uniform(0.25, 0.55), rng.uniform(0.014, 0.028))
    if "Effusion" in findings:
        anatomy.effusion = (int(rng.choice([-1, 1])), rng.uniform(0.08, 0.16))
    return anatomy


def sample_shot(rng: np.random.Generator, ap: bool = False) -> Shot:
    """Positioning, technique and processing differ from film to film, follow-ups included (NIH images come
    from many rooms and years); portable AP films are blurrier and more often carry leads and lines."""
    leads = rng.random() < (0.7 if ap else 0.15)
    n_leads = int(rng.integers(2, 6)) if leads else 0
    has_line = rng.random() < (0.4 if ap else 0.08)
    shutter = rng.random() < 0.2
    return Shot(
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        shift=(rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.08)),
        zoom=rng.uniform(0.9, 1.15),
        inspiration=rng.uniform(-0.03, 0.03),
        mu=rng.uniform(1.4, 2.3),
        gamma=rng.uniform(0.8, 1.3),
        noise=rng.uniform(0.008, 0.03),
        noise_seed=int(rng.integers(2**31)),
        ap=ap,
        contrast=rng.uniform(0.75, 1.1),
        level=rng.uniform(-0.16, 0.03),
        blur=rng.uniform(0.001, 0.006) + (0.003 if ap else 0.0),
        shutters=tuple(float(w) for w in rng.uniform(0.0, 0.05, 4) * (rng.random(4) < 0.5)) if shutter
        else (0.0, 0.0, 0.0, 0.0),
        marker=(float(rng.choice([-1, 1]) * rng.uniform(0.34, 0.44)), float(rng.uniform(0.03, 0.12)),
                float(rng.uniform(0.025, 0.045))) if rng.random() < 0.7 else None,
        leads=np.stack([rng.uniform(-0.33, 0.33, n_leads), rng.uniform(0.15, 0.75, n_leads)], 1).astype(np.float32),
        line=(float(rng.uniform(-0.05, 0.08)), float(rng.uniform(0.35, 0.6)), float(rng.uniform(-0.1, 0.1)))
        if has_line else None,
    )


def _step(z: np.ndarray, width: float) -> np.ndarray:
    """Smooth 0→1 step at z = 0 over about `width`; positive z is inside."""
    return 0.5 * (1.0 + np.tanh(z / width))


def _bump(z: np.ndarray, half: float, width: float) -> np.ndarray:
    """1 inside |z| < half, smooth edges."""
    return _step(half - np.abs(z), width)


class _Canvas:
    """Pose-transformed coordinates of every pixel, and windows onto them for features that cover little."""

    def __init__(self, shot: Shot, size: int):
        self.size = size
        c = (np.arange(size, dtype=np.float32) + 0.5) / size
        u, v = np.meshgrid(c - 0.5, c, indexing="xy")
        cos, sin = math.cos(shot.angle), math.sin(shot.angle)
        u0, v0 = (u - shot.shift[0]) / shot.zoom, (v - 0.5 - shot.shift[1]) / shot.zoom
        self.x = (cos * u0 + sin * v0).astype(np.float32)
        self.y = (-sin * u0 + cos * v0 + 0.5).astype(np.float32)
        self.margin = 0.05 + 0.5 * abs(1.0 - 1.0 / shot.zoom) + max(map(abs, shot.shift))

    def window(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Pixels that can hold anatomy points in [x0,x1]×[y0,y1]; the margin covers this shot's pose."""
        m = self.margin
        s = self.size
        cols = slice(max(0, int((x0 + 0.5 - m) * s)), min(s, int(math.ceil((x1 + 0.5 + m) * s))))
        rows = slice(max(0, int((y0 - m) * s)), min(s, int(math.ceil((y1 + m) * s))))
        return rows, cols


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise: a cells×cells random field upsampled bicubically, unit-ish amplitude."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(small, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


# Anatomy is rendered at most at this side and upsampled beyond it: the structures are smooth at this scale,
# and a full 1024-px rendering would cost 4× the time for no visible detail. Noise is added at full size.
MAX_RENDER = 512


def render(anatomy: Anatomy, shot: Shot, size: int) -> np.ndarray:
    """One image, uint8 [size, size]."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(shot.noise_seed)
    side = min(size, MAX_RENDER)
    img = _film(anatomy, shot, side, rng)
    img = np.clip((img - 0.5) * shot.contrast + 0.5 + shot.level, 0.0, 1.0)
    img = _collimate(img, shot.shutters)
    img = gaussian_filter(img, shot.blur * side, mode="nearest")
    img = _burn_in_marker(img, shot.marker)
    if size > MAX_RENDER:
        img = np.asarray(Image.fromarray(img, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    # Quantum mottle: noise correlated over ~2 px (filtered, then scaled back to unit variance); a film
    # downsampled below 512 px averages it away in proportion.
    noise = rng.standard_normal(img.shape, dtype=np.float32)
    noise = (noise + np.roll(noise, 1, 0) + np.roll(noise, 1, 1) + np.roll(noise, (1, 1), (0, 1))) / 2.0
    img = img + shot.noise * min(1.0, size / MAX_RENDER) * noise * (0.4 + 0.6 * np.sqrt(np.clip(img, 0, 1)))
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def _collimate(img: np.ndarray, shutters: tuple[float, float, float, float]) -> np.ndarray:
    """Margins outside the collimator get no exposure; processing shows them nearly black."""
    size = img.shape[0]
    left, right, top, bottom = (int(round(w * size)) for w in shutters)
    out = img.copy()
    for rows, cols in ((slice(None), slice(0, left)), (slice(None), slice(size - right, size)),
                       (slice(0, top), slice(None)), (slice(size - bottom, size), slice(None))):
        out[rows, cols] *= 0.08
    return out


def _burn_in_marker(img: np.ndarray, marker: tuple[float, float, float] | None) -> np.ndarray:
    """A bright, sharp 'L'-shaped side marker near a top corner, as the radiographer's lead letter leaves it."""
    if marker is None:
        return img
    size = img.shape[0]
    mx, my, h = marker
    x0, y0 = int((mx + 0.5) * size), int(my * size)
    hp, wp = max(2, int(round(h * size))), max(1, int(round(0.25 * h * size)))
    out = img.copy()
    out[y0 : y0 + hp, x0 : x0 + wp] = 0.97
    out[y0 + hp - wp : y0 + hp, x0 : x0 + max(2, int(0.6 * hp))] = 0.97
    return out


def _film(anatomy: Anatomy, shot: Shot, size: int, rng: np.random.Generator) -> np.ndarray:
    """Noise-free film brightness in [0, 1], float32 [size, size]."""
    a = anatomy
    e = 0.8 / size
    cv = _Canvas(shot, size)
    x, y = cv.x, cv.y
    ax = np.abs(x)
    side = np.sign(x)
    # A portable AP film magnifies the heart (it lies far from the detector) and projects the clavicles higher.
    heart_scale = 1.12 if shot.ap else 1.0
    clavicle_lift = 0.03 if shot.ap else 0.0

    # Soft tissue: neck widening into the shoulders, elliptical thickness profile across the torso.
    shoulder = a.shoulder_y + 0.25 * np.clip(ax - a.neck_w, 0, None) ** 1.5
    torso = _step(y - shoulder, 2 * e) * _step(a.body_w - ax, 2 * e)
    inside = np.maximum(torso, _step(a.neck_w - ax, 2 * e))
    half_w = np.where(torso > 0.5, a.body_w, a.neck_w)
    thickness = np.sqrt(np.clip(1.0 - (x / (half_w + 0.04)) ** 2, 0.0, 1.0))
    att = 0.5 * a.soft * inside * (0.3 + 0.7 * thickness)
    # Upper arms at the frame edges, when they hang down.
    if a.arms_down:
        arm = _step(ax - (a.body_w + 0.012), 2 * e) * _step(y - shoulder - 0.04, 0.03)
        att += 0.32 * a.soft * arm * (0.7 + 0.3 * np.clip((ax - a.body_w) / 0.05, 0, 1))

    # Diaphragm: right dome (image left) higher than the left; deeper inspiration pushes both down.
    dia_top = np.float32(a.dia_y + shot.inspiration) + np.where(side > 0, np.float32(a.dia_left_drop), np.float32(0))
    t = (ax - 0.18) / 0.2
    dia = dia_top + 0.05 * t**2 + 0.1 * np.clip(t, 0, None) ** 2
    below = _step(y - dia, 1.5 * e)
    att += 0.16 * below * inside

    # Lungs: apex dome, lateral wall, medial border against the mediastinum, diaphragm below.
    tl = np.clip((y - a.apex_y) / 0.3, 0.0, 1.0)
    lateral = 0.12 + (a.lung_w - 0.12) * np.sqrt(1.0 - (1.0 - tl) ** 2) - 0.1 * np.clip(y - 0.7, 0, None)
    apex = a.apex_y + 1.6 * (ax - 0.16) ** 2
    medial = a.med_w + 0.03 * np.clip(y - 0.3, 0, None)
    lung_edge = np.minimum(np.minimum(lateral - ax, y - apex), np.minimum(ax - medial, dia - y))
    lung = _step(lung_edge, 1.2 * e)
    depth = np.clip(lung_edge / 0.07, 0.0, 1.0) ** 0.7

    # Heart: a tilted ellipse whose lower part sinks into the diaphragm, bulging to the patient's left,
    # with the aortic knob on the left upper mediastinal border.
    hx, hy = x - a.heart_cx, y - a.heart_cy
    tilt = math.radians(38)
    ha, hb = a.heart_a * heart_scale, a.heart_b * heart_scale
    hr = ((hx * math.cos(tilt) + hy * math.sin(tilt)) / ha) ** 2 + ((-hx * math.sin(tilt) + hy * math.cos(tilt)) / hb) ** 2
    heart = _step(1.0 - hr, 5 * e / ha)
    knob = _step(1.0 - ((x - a.med_w - 0.008) ** 2 + (y - 0.34) ** 2) / 0.03**2, 0.12)
    heart = np.maximum(heart, knob)
    # The middle of the lung is a thick slab of air; its edges and where the heart overlaps are thin.
    air = lung * (0.3 + 0.7 * depth) * (1.0 - 0.92 * heart)
    texture = 0.6 * _smooth_noise(rng, size, 40) + 0.4 * _smooth_noise(rng, size, 90)
    att -= a.lung_air * air * inside * (1.0 + 0.06 * texture)
    # Lower zones look lighter: more soft tissue (and breast) overlaps them.
    att += 0.06 * lung * np.clip((y - 0.45) / 0.3, 0, 1)
    if a.breast > 0:
        for sx in (-1.0, 1.0):
            mound = np.clip(1.0 - ((x - sx * 0.22) / 0.17) ** 2 - ((y - dia + 0.02) / 0.16) ** 2, 0.0, 1.0)
            att += a.breast * np.sqrt(mound) * _step(y - (dia - 0.14), 0.03) * inside

    # Vessels branching from the hila, brightest and widest near the hilum, plus the hilar shadows.
    for sd, ang, length, width, strength in a.vessels:
        hx0, hy0 = sd * (a.med_w + 0.03 + 0.02 * abs(math.sin(3 * ang))), 0.38 + 0.05 * (ang + 1.3)
        for branch in (0.0, 0.4, -0.4):
            aa = ang + branch
            dx, dy = sd * math.cos(aa), math.sin(aa)
            x0 = hx0 + (0.0 if branch == 0 else dx * length * 0.35)
            y0 = hy0 + (0.0 if branch == 0 else dy * length * 0.35)
            seg = length * (1.0 if branch == 0 else 0.6)
            x1, y1 = x0 + dx * seg, y0 + dy * seg
            r, cl = cv.window(min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1))
            xs, ys = x[r, cl], y[r, cl]
            proj = np.clip((xs - x0) * dx + (ys - y0) * dy, 0, seg)
            dist = np.hypot(xs - x0 - proj * dx, ys - y0 - proj * dy)
            w = width * (1.0 - 0.6 * proj / seg) * (1.0 if branch == 0 else 0.7)
            att[r, cl] += strength * 0.5 * (1.0 - proj / seg) * _step(w - dist, e) * lung[r, cl]
    att += 0.1 * lung * np.exp(-(((ax - a.med_w - 0.045) / 0.03) ** 2) - ((y - 0.44) / 0.06) ** 2)

    # Trachea and main bronchi: air column down the midline, splitting at the carina.
    carina = 0.34
    trachea = _bump(x - 0.004, 0.017, e) * _step(carina - y, e)
    bron_d = np.abs(ax - (y - carina) * 0.9)
    bronchi = _step(0.011 - bron_d, e) * _step(y - carina, e) * _step(carina + 0.08 - y, 2 * e)
    att -= 0.1 * (trachea + 0.7 * bronchi)

    # The heart is denser than the soft tissue around it. (Extra mediastinal soft tissue made the midline brighter
    # than NIH films': the spine and the missing lung air already make it the brightest band.)
    att += 0.03 * heart * inside

    # Spine: vertebral bodies separated by darker discs, pedicles as small ovals.
    period = a.rib_gap * 0.95
    phase = ((y - a.rib_y0) / period) % 1.0
    spine = _bump(x, 0.03, 2 * e)
    disc = _bump(phase - 0.9, 0.07, 0.012)
    att += 0.035 * spine * (1.0 - 0.5 * disc)
    ped = np.exp(-(((ax - 0.024) / 0.008) ** 2) - ((phase - 0.45) / 0.16) ** 2)
    att += 0.03 * ped * spine

    # Ribs: posterior arcs rise slightly from the spine then bend down at the chest wall; anterior arcs run
    # back down towards the sternum and are fainter. Cortical edges are brighter than the marrow.
    cage = _step(lateral + 0.035 - ax, 2 * e) * _step(a.body_w - 0.01 - ax, e) * (1.0 - 0.7 * below)
    for i in range(10):
        yi = a.rib_y0 + i * a.rib_gap * (1.0 + 0.03 * i)
        r, cl = cv.window(-0.5, 0.5, yi - 0.06, yi + 0.25)
        xs, ys, axs = x[r, cl], y[r, cl], ax[r, cl]
        d = np.clip((axs - 0.02) / a.lung_w, 0.0, 1.2)
        w = a.rib_w * (1.0 + 0.3 * d)
        post = yi - 0.04 * d + 0.12 * d**4
        dist = np.abs(ys - post)
        band = _step(w / 2 - dist, e)
        cortex = band - _step(0.3 * w - dist, e)
        ribs = 0.6 * band + 0.4 * cortex
        ant = yi + 0.08 + 0.17 * np.clip(1.0 - d, 0.0, None) ** 1.3
        aband = _step(0.35 * w - np.abs(ys - ant), e) * _step(d - 0.4, 0.05) * _step(1.0 - d, 0.02)
        att[r, cl] += a.rib_density * (ribs + 0.45 * aband) * cage[r, cl]

    # Clavicles: S-curves from the sternal notch out to the shoulders.
    tc = np.clip((ax - 0.035) / 0.34, 0.0, 1.0)
    clav_y = a.apex_y + 0.07 - clavicle_lift - 0.05 * tc + 0.014 * np.sin(2 * math.pi * tc)
    clav_half = 0.013 + 0.004 * np.sin(math.pi * tc)
    clav = _bump(y - clav_y, clav_half, e) * _step(ax - 0.03, e) * _step(0.39 - ax, 0.01)
    att += 0.12 * clav * (0.7 + 0.3 * (1 - _bump(y - clav_y, 0.6 * clav_half, e)))
    # Scapulae: faint medial borders overlapping the upper lateral lung; humeral heads at the shoulders.
    scap = _step(ax - (a.lung_w - 0.05 + 0.12 * (y - 0.2)), 2 * e) * _step(y - 0.13, 0.02) * _step(0.45 - y, 0.03)
    att += 0.04 * scap * inside
    hum_y = a.shoulder_y + 0.25 * (a.body_w - a.neck_w) ** 1.5 + 0.06
    hum = np.sqrt(np.clip(1 - ((ax - a.body_w - 0.02) / 0.06) ** 2 - ((y - hum_y) / 0.08) ** 2, 0, 1))
    att += 0.14 * hum

    # Gastric bubble under the left hemidiaphragm (image right).
    bubble = _step(1.0 - ((x - 0.17) / 0.055) ** 2 - ((y - dia_top - 0.06) / 0.03) ** 2, 0.2)
    att -= 0.1 * bubble * (x > 0)

    # Findings.
    if a.nodule is not None:
        nx, ny, nr = a.nodule
        att += 0.1 * np.sqrt(np.clip(1.0 - ((x - nx) ** 2 + (y - ny) ** 2) / nr**2, 0.0, 1.0))
    if a.effusion is not None:
        es, eh = a.effusion
        # Fluid layers at the base and climbs the lateral wall (meniscus), blunting the costophrenic angle.
        on_side = _step(es * x - a.med_w, e)
        level = dia - eh * (0.3 + 0.7 * np.clip((ax - 0.1) / (a.lung_w - 0.1), 0, 1) ** 1.5)
        fluid = _step(y - level, 0.012) * on_side * lung
        att += 0.35 * fluid * (0.3 + 0.7 * depth)

    att += _devices(shot, cv, e)
    att = np.clip(att, 0.0, None)
    img = 1.0 - np.exp(-shot.mu * att)
    return (np.clip(img / (1.0 - math.exp(-shot.mu * 0.9)), 0.0, 1.0) ** shot.gamma).astype(np.float32)


def _devices(shot: Shot, cv: _Canvas, e: float) -> np.ndarray:
    """Radio-opaque things on or in the patient: ECG electrodes (a metal snap in a ring) and a catheter
    entering at the neck and bowing down into the chest."""
    x, y = cv.x, cv.y
    att = np.zeros_like(x)
    for lx, ly in shot.leads:
        r, cl = cv.window(lx - 0.03, lx + 0.03, ly - 0.03, ly + 0.03)
        dist = np.hypot(x[r, cl] - lx, y[r, cl] - ly)
        att[r, cl] += 0.5 * _bump(dist - 0.014, 0.003, e) + 0.8 * _step(0.005 - dist, e)
    if shot.line is not None:
        end_x, end_y, bow = shot.line
        t = np.linspace(0.0, 1.0, 40, dtype=np.float32)
        px = (0.06 + (end_x - 0.06) * t + bow * 4 * t * (1 - t)).astype(np.float32)
        py = (-0.02 + (end_y + 0.02) * t).astype(np.float32)
        r, cl = cv.window(float(px.min()), float(px.max()), float(py.min()), float(py.max()))
        xs, ys = x[r, cl][..., None], y[r, cl][..., None]
        dist = np.sqrt(((xs - px) ** 2 + (ys - py) ** 2).min(-1))
        att[r, cl] += 0.35 * _step(0.004 - dist, e)
    return att


@dataclass
class PhantomRecord:
    name: str
    patient: int
    follow_up: int
    labels: tuple[str, ...]
    age: int
    gender: str
    view: str


def plan_phantoms(patients: int, images_per_patient: int, seed: int) -> list[tuple[PhantomRecord, Anatomy, Shot]]:
    """Everything random is decided here, in one stream, so that images can be rendered in any order."""
    rng = np.random.default_rng([seed, PHANTOM_VERSION])
    plan = []
    for p in range(1, patients + 1):
        age, gender = int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))
        anatomy = sample_anatomy(rng, female=gender == "F")
        for k in range(images_per_patient):
            shot = sample_shot(rng, ap=bool(rng.random() < 0.15))
            rec = PhantomRecord(f"{p:08d}_{k:03d}.png", p, k, anatomy.findings, age + k // 4, gender,
                                "AP" if shot.ap else "PA")
            plan.append((rec, anatomy, shot))
    return plan


def _render_to_png(job: tuple[Path, Anatomy, Shot, int]) -> None:
    path, anatomy, shot, size = job
    buf = io.BytesIO()
    Image.fromarray(render(anatomy, shot, size), mode="L").save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def write_phantoms(
    out: Path, patients: int, images_per_patient: int, size: int, seed: int, workers: int = 0,
    test_fraction: float = 0.2, progress_cb=None,
) -> list[PhantomRecord]:
    """Render into ``out`` in the NIH layout: images/*.png, Data_Entry_2017_v2020.csv, train_val/test lists."""
    from medsyngan.data.parallel import map_in_workers
    from medsyngan.rundir import atomic_write_text

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan = plan_phantoms(patients, images_per_patient, seed)
    jobs = [(out / "images" / rec.name, anatomy, shot, size) for rec, anatomy, shot in plan]
    for _ in map_in_workers(_render_to_png, jobs, workers=workers, cost=size * size):
        if progress_cb is not None:
            progress_cb(1)

    records = [rec for rec, _, _ in plan]
    spacing = round(0.143 * 2048 / size, 6)
    rows = io.StringIO()
    rows.write(NIH_HEADER + "\n")
    writer = csv.writer(rows, lineterminator="\n")
    for r in records:
        writer.writerow(
            [r.name, format_labels(r.labels), r.follow_up, r.patient, r.age, r.gender, r.view, size, size,
             spacing, spacing]
        )
    atomic_write_text(out / NIH_CSV_NAME, rows.getvalue())
    split_rng = np.random.default_rng([seed, PHANTOM_VERSION, 1])
    test_patients = set(
        (split_rng.permutation(patients)[: int(round(test_fraction * patients))] + 1).tolist()
    ) if patients > 1 else set()
    atomic_write_text(out / "train_val_list.txt", "".join(r.name + "\n" for r in records if r.patient not in test_patients))
    atomic_write_text(out / "test_list.txt", "".join(r.name + "\n" for r in records if r.patient in test_patients))
    return records
