"""Seeded procedural generator of PCB component images for the default "pcb-aoi" CoE.

Each image is a top view of one component on its footprint, as a line-side AOI camera sees it:
solder mask, copper pads, silkscreen (outline, reference designator, polarity mark), the
component body, its leads and the solder joints. Defects change the joints or the body; a
scene is then rotated, flipped, lit, blurred and noised so the task is not trivial.

Determinism: image ``i`` of (component, defect) under ``seed`` is drawn from its own RNG
(`image_rng`), so any subset of a data set can be regenerated identically, in any order.

Polarity is a *relation*: a part is reversed when its own marker (cathode band, can stripe,
pin-1 dot) sits on the other side from the board's silkscreen mark. Rotations and flips of
the whole scene keep that relation, so they are safe augmentations.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = "pcb-aoi-gen-3"
IMAGE_SIZE_PX = 96
_SCALE = 2  # draw at 2x, then downsample with antialiasing
_S = IMAGE_SIZE_PX * _SCALE

COMPONENTS: tuple[str, ...] = (
    "chip_resistor",
    "chip_capacitor",
    "sot23",
    "soic",
    "qfp",
    "electrolytic_capacitor",
    "diode",
    "led",
    "connector",
)
POLARIZED: frozenset[str] = frozenset({"soic", "electrolytic_capacitor", "diode", "led"})
COMMON_DEFECTS: tuple[str, ...] = ("ok", "missing", "misaligned", "solder_bridge", "insufficient_solder")
DEFECTS: tuple[str, ...] = COMMON_DEFECTS + ("reversed_polarity",)
_DESIGNATORS = {
    "chip_resistor": "R", "chip_capacitor": "C", "sot23": "Q", "soic": "U", "qfp": "U",
    "electrolytic_capacitor": "C", "diode": "D", "led": "LED", "connector": "J",
}


def defects_for(component: str) -> tuple[str, ...]:
    """The defects that can occur on `component` (reversed polarity only on polarized parts)."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {list(COMPONENTS)}")
    return DEFECTS if component in POLARIZED else COMMON_DEFECTS


def all_pairs() -> list[tuple[str, str]]:
    """Every valid (component, defect) pair, in a fixed order."""
    return [(c, d) for c in COMPONENTS for d in defects_for(c)]


def image_rng(seed: int, component: str, defect: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{GENERATOR_VERSION}|{seed}|{component}|{defect}|{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


@dataclass(frozen=True)
class Joint:
    """One solder joint: the copper pad (board frame) and the lead end that sits on it (part frame)."""

    pad: tuple[float, float, float, float]  # x0, y0, x1, y1
    lead: tuple[float, float, float, float]
    side: str  # which way the lead points: "l", "r", "t", "b"


@dataclass
class _Part:
    joints: list[Joint]
    body: tuple[float, float, float, float]
    draw_body: Callable[..., None]  # (draw, transform, rng, reversed) -> None
    silk_mark: tuple[float, float] | None = None  # where the polarity mark is printed on the board
    through_hole: bool = False


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _rgb(rng: np.random.Generator, base: tuple[int, int, int], jitter: int = 12) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


# ----------------------------------------------------------------------------- geometry
class _Affine:
    """Maps part-frame points to board-frame points: rotate by `angle_deg` about the centre, then shift."""

    def __init__(self, dx: float = 0.0, dy: float = 0.0, angle_deg: float = 0.0, cx: float = _S / 2, cy: float = _S / 2):
        self.dx, self.dy, self.cx, self.cy = dx, dy, cx, cy
        self.cos, self.sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))

    def pt(self, x: float, y: float) -> tuple[float, float]:
        x, y = x - self.cx, y - self.cy
        return (self.cx + x * self.cos - y * self.sin + self.dx, self.cy + x * self.sin + y * self.cos + self.dy)

    def rect(self, r: tuple[float, float, float, float]) -> list[tuple[float, float]]:
        x0, y0, x1, y1 = r
        return [self.pt(x0, y0), self.pt(x1, y0), self.pt(x1, y1), self.pt(x0, y1)]

    def ellipse_poly(self, r: tuple[float, float, float, float], n: int = 24) -> list[tuple[float, float]]:
        x0, y0, x1, y1 = r
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        return [self.pt(cx + rx * math.cos(2 * math.pi * k / n), cy + ry * math.sin(2 * math.pi * k / n)) for k in range(n)]


def _toward_pad_end(j: Joint, frac: float) -> tuple[float, float, float, float]:
    """The part of the pad beyond the lead tip (where the fillet goes), `frac` of its length."""
    x0, y0, x1, y1 = j.pad
    lx0, ly0, lx1, ly1 = j.lead
    if j.side == "l":
        return (max(x0, lx0 - (lx0 - x0) * frac - 2), y0 + 1, lx0 + 3, y1 - 1)
    if j.side == "r":
        return (lx1 - 3, y0 + 1, min(x1, lx1 + (x1 - lx1) * frac + 2), y1 - 1)
    if j.side == "t":
        return (x0 + 1, max(y0, ly0 - (ly0 - y0) * frac - 2), x1 - 1, ly0 + 3)
    return (x0 + 1, ly1 - 3, x1 - 1, min(y1, ly1 + (y1 - ly1) * frac + 2))


# ----------------------------------------------------------------------------- footprints
def _two_terminal(rng, length, width, pad_len, pad_w, lead_frac, body_col, lead_col, marker=None):
    c = _S / 2
    bx0, bx1, by0, by1 = c - length / 2, c + length / 2, c - width / 2, c + width / 2
    lead_len = length * lead_frac
    gap = _u(rng, 2, 6)
    joints = [
        Joint((bx0 - pad_len + lead_len * 0.6, c - pad_w / 2, bx0 + lead_len + gap, c + pad_w / 2),
              (bx0, by0 + 1, bx0 + lead_len, by1 - 1), "l"),
        Joint((bx1 - lead_len - gap, c - pad_w / 2, bx1 + pad_len - lead_len * 0.6, c + pad_w / 2),
              (bx1 - lead_len, by0 + 1, bx1, by1 - 1), "r"),
    ]

    def draw_body(d: ImageDraw.ImageDraw, t: _Affine, rng, reversed_: bool) -> None:
        d.polygon(t.rect((bx0 + lead_len, by0, bx1 - lead_len, by1)), fill=body_col)
        for j in joints:
            d.polygon(t.rect(j.lead), fill=lead_col)
        if marker is not None:
            marker(d, t, (bx0 + lead_len, by0, bx1 - lead_len, by1), reversed_)

    return joints, (bx0, by0, bx1, by1), draw_body


def _chip(rng, component):
    if component == "chip_resistor":  # 0603-like: slim, black with a printed code
        length, width = _u(rng, 54, 62), _u(rng, 26, 30)
        body, lead = _rgb(rng, (28, 28, 30), 8), _rgb(rng, (205, 205, 200), 10)

        def code(d, t, r, _rev):
            x0, y0, x1, y1 = r
            for k in range(3):
                xs = x0 + (x1 - x0) * (0.22 + 0.22 * k)
                d.polygon(t.rect((xs, y0 + (y1 - y0) * 0.3, xs + 4, y1 - (y1 - y0) * 0.3)), fill=(200, 200, 200))

        return _two_terminal(rng, length, width, _u(rng, 16, 20), width + 10, 0.2, body, lead, code)
    # chip capacitor, 0805-like: wider, tan/brown, no marking
    length, width = _u(rng, 66, 76), _u(rng, 40, 46)
    body, lead = _rgb(rng, (176, 132, 84), 14), _rgb(rng, (195, 195, 190), 10)
    return _two_terminal(rng, length, width, _u(rng, 20, 24), width + 14, 0.18, body, lead)


def _band_marker(color):
    """Cathode band: a stripe on the right end of the body (left when reversed)."""

    def marker(d, t, r, reversed_):
        x0, y0, x1, y1 = r
        w = (x1 - x0) * 0.26
        band = (x0 + 2, y0, x0 + 2 + w, y1) if reversed_ else (x1 - 2 - w, y0, x1 - 2, y1)
        d.polygon(t.rect(band), fill=color)

    return marker


def _diode(rng):
    length, width = _u(rng, 78, 86), _u(rng, 46, 52)
    body = _rgb(rng, (52, 52, 56), 8)
    return _two_terminal(rng, length, width, _u(rng, 22, 26), width + 8, 0.16, body, _rgb(rng, (190, 190, 185)),
                         _band_marker(_rgb(rng, (215, 215, 210), 10)))


def _led(rng):
    length, width = _u(rng, 52, 58), _u(rng, 34, 38)
    body = _rgb(rng, (232, 228, 214), 10)
    dome = [(220, 40, 40), (40, 200, 60), (60, 90, 230), (240, 200, 40)][int(rng.integers(0, 4))]
    band = _band_marker(_rgb(rng, (40, 150, 60), 10))

    def marker(d, t, r, reversed_):
        x0, y0, x1, y1 = r
        cx, cy, rr = (x0 + x1) / 2, (y0 + y1) / 2, (y1 - y0) * 0.3
        d.polygon(t.ellipse_poly((cx - rr, cy - rr, cx + rr, cy + rr)), fill=dome)
        band(d, t, r, reversed_)

    return _two_terminal(rng, length, width, _u(rng, 14, 18), width + 6, 0.16, body, _rgb(rng, (200, 200, 195)), marker)


def _electrolytic(rng):
    side = _u(rng, 84, 96)
    c = _S / 2
    base_col, can_col = _rgb(rng, (30, 30, 34), 6), _rgb(rng, (196, 198, 204), 10)
    stripe_col = [(25, 25, 30), (30, 50, 160)][int(rng.integers(0, 2))]
    joints, body, _ = _two_terminal(rng, side + 18, 22, _u(rng, 22, 26), 30, 0.16, base_col, _rgb(rng, (190, 190, 185)))

    def draw_body(d, t, rng_, reversed_):
        for j in joints:
            d.polygon(t.rect(j.lead), fill=(190, 190, 185))
        h = side / 2
        # square base with the + side (right) chamfered
        d.polygon([t.pt(c - h, c - h), t.pt(c + h - 14, c - h), t.pt(c + h, c - h + 14), t.pt(c + h, c + h - 14),
                   t.pt(c + h - 14, c + h), t.pt(c - h, c + h)], fill=base_col)
        rr = h - 6
        d.polygon(t.ellipse_poly((c - rr, c - rr, c + rr, c + rr)), fill=can_col)
        # the dark sector marks the negative terminal: left normally, right when reversed
        sx = (c + rr * 0.3, c + rr * 0.95) if reversed_ else (c - rr * 0.95, c - rr * 0.3)
        d.polygon(t.rect((sx[0], c - rr * 0.8, sx[1], c + rr * 0.8)), fill=stripe_col)

    return joints, (c - side / 2, c - side / 2, c + side / 2, c + side / 2), draw_body


def _leaded_ic(rng, component):
    c = _S / 2
    if component == "sot23":
        bw, bh, lead_w, lead_l = _u(rng, 56, 62), _u(rng, 30, 34), 9.0, 14.0
        layout = {"b": [-0.33, 0.33], "t": [0.0]}
    elif component == "soic":
        bw, bh, lead_w, lead_l = _u(rng, 92, 100), _u(rng, 54, 60), 7.0, 16.0
        layout = {s: [-0.375, -0.125, 0.125, 0.375] for s in ("t", "b")}
    else:  # qfp
        bw = bh = _u(rng, 86, 94)
        lead_w, lead_l = 5.0, 14.0
        pos = [-0.36 + 0.144 * k for k in range(6)]
        layout = {s: pos for s in ("t", "b", "l", "r")}
    joints = []
    for side, positions in layout.items():
        for p in positions:
            if side in ("t", "b"):
                x = c + p * bw
                y_body = c - bh / 2 if side == "t" else c + bh / 2
                sgn = -1 if side == "t" else 1
                lead = (x - lead_w / 2, min(y_body, y_body + sgn * lead_l), x + lead_w / 2, max(y_body, y_body + sgn * lead_l))
                pad_near, pad_far = y_body + sgn * lead_l * 0.35, y_body + sgn * (lead_l + 9)
                pad = (x - lead_w / 2 - 2.5, min(pad_near, pad_far), x + lead_w / 2 + 2.5, max(pad_near, pad_far))
            else:
                y = c + p * bh
                x_body = c - bw / 2 if side == "l" else c + bw / 2
                sgn = -1 if side == "l" else 1
                lead = (min(x_body, x_body + sgn * lead_l), y - lead_w / 2, max(x_body, x_body + sgn * lead_l), y + lead_w / 2)
                pad_near, pad_far = x_body + sgn * lead_l * 0.35, x_body + sgn * (lead_l + 9)
                pad = (min(pad_near, pad_far), y - lead_w / 2 - 2.5, max(pad_near, pad_far), y + lead_w / 2 + 2.5)
            joints.append(Joint(pad, lead, side))
    body_col, lead_col = _rgb(rng, (36, 36, 40), 8), _rgb(rng, (200, 200, 196), 10)
    body = (c - bw / 2, c - bh / 2, c + bw / 2, c + bh / 2)

    def draw_body(d, t, rng_, reversed_):
        for j in joints:
            d.polygon(t.rect(j.lead), fill=lead_col)
        d.polygon(t.rect(body), fill=body_col)
        if component in ("soic", "qfp"):  # pin-1 dot: top-left normally, bottom-right when reversed
            x0, y0, x1, y1 = body
            dx, dy = (x1 - 14, y1 - 14) if reversed_ else (x0 + 14, y0 + 14)
            d.polygon(t.ellipse_poly((dx - 8, dy - 8, dx + 8, dy + 8)), fill=(150, 150, 156))

    return joints, body, draw_body


def _connector(rng):
    c = _S / 2
    n = int(rng.integers(4, 7))
    pitch = _u(rng, 24, 27)
    xs = [c + (k - (n - 1) / 2) * pitch for k in range(n)]
    joints = [Joint((x - 9, c - 9, x + 9, c + 9), (x - 4, c - 4, x + 4, c + 4), "t") for x in xs]
    housing = (xs[0] - pitch / 2, c - pitch / 2 - 4, xs[-1] + pitch / 2, c + pitch / 2 + 4)
    housing_col, pin_col = _rgb(rng, (24, 24, 26), 6), _rgb(rng, (214, 186, 90), 12)

    def draw_body(d, t, rng_, reversed_):
        d.polygon(t.rect(housing), fill=housing_col)
        for j in joints:
            x0, y0, x1, y1 = j.lead
            d.polygon(t.rect((x0 - 1, y0 - 1, x1 + 1, y1 + 1)), fill=pin_col)

    return joints, housing, draw_body


# ----------------------------------------------------------------------------- rendering
def _build_part(rng, component) -> _Part:
    if component in ("chip_resistor", "chip_capacitor"):
        joints, body, draw_body = _chip(rng, component)
    elif component == "diode":
        joints, body, draw_body = _diode(rng)
    elif component == "led":
        joints, body, draw_body = _led(rng)
    elif component == "electrolytic_capacitor":
        joints, body, draw_body = _electrolytic(rng)
    elif component in ("sot23", "soic", "qfp"):
        joints, body, draw_body = _leaded_ic(rng, component)
    else:
        joints, body, draw_body = _connector(rng)
    silk = None
    if component in ("diode", "led"):
        silk = (body[2] + 14, _S / 2)  # cathode bar beyond the right pad
    elif component == "electrolytic_capacitor":
        silk = (body[2] + 10, body[1] - 4)  # "+" near the right (positive) side
    elif component == "soic":
        silk = (body[0] - 6, body[1] - 20)  # pin-1 dot outside the top-left corner
    return _Part(joints, body, draw_body, silk, through_hole=component == "connector")


def _draw_board(d: ImageDraw.ImageDraw, rng) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    mask = [(30, 110, 50), (24, 90, 40), (30, 60, 130), (28, 28, 30), (140, 30, 30), (70, 40, 110)]
    weights = np.array([0.4, 0.15, 0.15, 0.1, 0.1, 0.1])
    mask_col = _rgb(rng, mask[int(rng.choice(len(mask), p=weights))], 10)
    d.rectangle((0, 0, _S, _S), fill=mask_col)
    trace_col = tuple(int(min(255, v * 1.25 + 8)) for v in mask_col)
    for _ in range(int(rng.integers(1, 4))):  # traces passing by
        if rng.random() < 0.5:
            y = _u(rng, 0, _S)
            d.line((0, y, _S, y + _u(rng, -30, 30)), fill=trace_col, width=int(rng.integers(4, 9)))
        else:
            x = _u(rng, 0, _S)
            d.line((x, 0, x + _u(rng, -30, 30), _S), fill=trace_col, width=int(rng.integers(4, 9)))
    silk_col = _rgb(rng, (236, 236, 228), 10)
    return mask_col, silk_col


def _draw_silkscreen(d, part: _Part, component: str, silk_col, rng) -> None:
    x0, y0, x1, y1 = part.body
    m = 22
    if rng.random() < 0.7:
        d.rectangle((x0 - m, y0 - m / 2, x1 + m, y1 + m / 2), outline=silk_col, width=2)
    tx, ty = _u(rng, 8, 30), _u(rng, 4, 12)
    d.text((tx, ty), f"{_DESIGNATORS[component]}{int(rng.integers(1, 99))}", fill=silk_col, font_size=18)
    if part.silk_mark is not None:
        sx, sy = part.silk_mark
        if component in ("diode", "led"):
            d.rectangle((sx - 4, sy - 26, sx + 4, sy + 26), fill=silk_col)
        elif component == "electrolytic_capacitor":
            d.rectangle((sx - 11, sy - 3, sx + 11, sy + 3), fill=silk_col)
            d.rectangle((sx - 3, sy - 11, sx + 3, sy + 11), fill=silk_col)
        else:
            d.ellipse((sx - 7, sy - 7, sx + 7, sy + 7), fill=silk_col)


def _fillet(d, t: _Affine, j: Joint, frac: float, solder_col) -> None:
    r = _toward_pad_end(j, frac)
    d.polygon(t.rect(r), fill=solder_col)
    hx0, hy0, hx1, hy1 = r
    hi = tuple(min(255, v + 25) for v in solder_col)
    if j.side in ("l", "r"):
        d.line([t.pt((hx0 + hx1) / 2, hy0 + 2), t.pt((hx0 + hx1) / 2, hy1 - 2)], fill=hi, width=2)
    else:
        d.line([t.pt(hx0 + 2, (hy0 + hy1) / 2), t.pt(hx1 - 2, (hy0 + hy1) / 2)], fill=hi, width=2)


def _bridge(d, part: _Part, rng, solder_col) -> None:
    """A solder strip joining two neighbouring joints (for two-terminal parts: along the body's side)."""
    js = part.joints
    if len(js) == 2:
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = js[0].pad, js[1].pad
        w = _u(rng, 6, 10)
        y = ay1 - w if rng.random() < 0.5 else ay0
        d.rectangle(((ax0 + ax1) / 2, y, (bx0 + bx1) / 2, y + w), fill=solder_col)
        return
    same_side = [(a, b) for a, b in zip(js, js[1:]) if a.side == b.side]
    a, b = same_side[int(rng.integers(0, len(same_side)))]
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.pad, b.pad
    w = _u(rng, 6, 9)
    if part.through_hole:
        cy = (ay0 + ay1) / 2 + _u(rng, -3, 3)
        d.rectangle((min(ax1, bx1) - 2, cy - w / 2, max(ax0, bx0) + 2, cy + w / 2), fill=solder_col)
        return
    # gull-wing leads: the excess solder joins the pad tips and spills past them onto the mask
    ext = _u(rng, 3, 6)
    xa, xb = sorted(((ax0 + ax1) / 2, (bx0 + bx1) / 2))
    ya, yb = sorted(((ay0 + ay1) / 2, (by0 + by1) / 2))
    if a.side == "t":
        d.rectangle((xa - 2, ay0 - ext, xb + 2, ay0 + w), fill=solder_col)
    elif a.side == "b":
        d.rectangle((xa - 2, ay1 - w, xb + 2, ay1 + ext), fill=solder_col)
    elif a.side == "l":
        d.rectangle((ax0 - ext, ya - 2, ax0 + w, yb + 2), fill=solder_col)
    else:
        d.rectangle((ax1 - w, ya - 2, ax1 + ext, yb + 2), fill=solder_col)


def render(component: str, defect: str, rng: np.random.Generator) -> Image.Image:
    """Render one IMAGE_SIZE_PX x IMAGE_SIZE_PX RGB image of `component` with `defect`."""
    if defect not in defects_for(component):
        raise ValueError(f"defect {defect!r} does not apply to {component!r}; expected one of {list(defects_for(component))}")
    img = Image.new("RGB", (_S, _S))
    d = ImageDraw.Draw(img)
    mask_col, silk_col = _draw_board(d, rng)
    part = _build_part(rng, component)
    _draw_silkscreen(d, part, component, silk_col, rng)

    copper = _rgb(rng, (206, 132, 62), 12)
    solder = _rgb(rng, (210, 212, 214), 10)
    hasl = rng.random() < 0.3  # pads pre-tinned (silver) rather than bare copper on some boards
    starved = _starved_joints(part, defect, rng)
    _draw_pads(d, part, copper, solder, hasl, starved)
    if defect == "missing":
        for j in part.joints:  # solder paste reflowed on empty pads
            x0, y0, x1, y1 = j.pad
            d.ellipse((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=solder)
    else:
        _draw_mounted_part(d, part, component, defect, rng, solder, starved)
    return _photometric(_scene_transforms(img, mask_col, rng), rng)


def _starved_joints(part: _Part, defect: str, rng) -> set[int]:
    """The joints an insufficient_solder defect starves: a quarter to a half of them (none for other defects)."""
    if defect != "insufficient_solder":
        return set()
    n = len(part.joints)
    k = int(rng.integers(max(1, n // 4), max(2, n // 2) + 1))
    return set(rng.choice(len(part.joints), size=k, replace=False).tolist())


def _draw_pads(d, part: _Part, copper, solder, hasl: bool, starved: set[int]) -> None:
    """Copper pads (through-hole: annular rings); a starved joint shows its bare, unwetted copper."""
    for idx, j in enumerate(part.joints):
        if part.through_hole:
            x0, y0, x1, y1 = j.pad
            d.ellipse(j.pad, fill=copper)
            d.ellipse((x0 + 6, y0 + 6, x1 - 6, y1 - 6), fill=(20, 20, 20))
        else:
            tinned = hasl and idx not in starved
            d.rectangle(j.pad, fill=tuple(int(0.55 * a + 0.45 * b) for a, b in zip(copper, solder)) if tinned else copper)


def _placement(component: str, defect: str, rng) -> _Affine:
    """Where the part sits on its footprint: centred, or for a misaligned one shifted (small two-terminal parts,
    sometimes) or rotated and shifted."""
    if defect != "misaligned":
        return _Affine()
    if component in ("chip_resistor", "chip_capacitor", "diode", "led") and rng.random() < 0.4:
        return _Affine(dx=_u(rng, -1, 1) * 6, dy=_u(rng, 16, 24) * (1 if rng.random() < 0.5 else -1))
    ang = _u(rng, 11, 22) * (1 if rng.random() < 0.5 else -1)
    return _Affine(dx=_u(rng, -10, 10), dy=_u(rng, -10, 10), angle_deg=ang)


def _draw_mounted_part(d, part: _Part, component: str, defect: str, rng, solder, starved: set[int]) -> None:
    """The part's body and leads where it was placed, its solder joints, and a bridge for solder_bridge."""
    t = _placement(component, defect, rng)
    part.draw_body(d, t, rng, defect == "reversed_polarity")
    for idx, j in enumerate(part.joints):
        if part.through_hole:
            x0, y0, x1, y1 = j.pad
            shrink = 6.5 if idx in starved else 1.5
            d.ellipse((x0 + shrink, y0 + shrink, x1 - shrink, y1 - shrink), outline=solder, width=4 if idx not in starved else 1)
        elif idx not in starved:
            _fillet(d, t, j, _u(rng, 0.75, 1.0), solder)
        elif rng.random() < 0.3:
            _fillet(d, t, j, _u(rng, 0.0, 0.1), tuple(int(v * 0.85) for v in solder))
    if defect == "solder_bridge":
        _bridge(d, part, rng, solder)


def _scene_transforms(img: Image.Image, mask_col, rng) -> np.ndarray:
    """90-degree placement, jitter rotation, flip, shift, downsampling and blur; the pixels as float32."""
    img = img.rotate(90 * int(rng.integers(0, 4)) + _u(rng, -8, 8), resample=Image.BILINEAR, fillcolor=mask_col,
                     translate=(_u(rng, -8, 8), _u(rng, -8, 8)))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.resize((IMAGE_SIZE_PX, IMAGE_SIZE_PX), Image.LANCZOS)
    blur = _u(rng, 0.0, 0.9)
    if blur > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(img, dtype=np.float32)


def _photometric(a: np.ndarray, rng) -> Image.Image:
    gain = _u(rng, 0.7, 1.3)
    cast = np.array([_u(rng, 0.9, 1.1) for _ in range(3)], dtype=np.float32)
    ramp = np.linspace(-1, 1, a.shape[0], dtype=np.float32)
    grad = 1 + _u(rng, -0.15, 0.15) * (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])
    a = a * gain * cast[None, None, :] * grad[..., None]
    a = 255.0 * np.power(np.clip(a / 255.0, 0, 1), _u(rng, 0.8, 1.25))
    a = a + rng.normal(0, _u(rng, 0.0, 6.0), a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def generate(component: str, defect: str, seed: int, index: int) -> Image.Image:
    """Image `index` of (`component`, `defect`) for `seed`: the same arguments always give the same pixels."""
    return render(component, defect, image_rng(seed, component, defect, index))
