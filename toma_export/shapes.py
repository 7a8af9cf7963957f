"""The "shapes" world: a procedural dataset the tiny models can learn on a CPU, and a judge can check.

One shape per image (circle, square or triangle) in one colour (red, green, blue or yellow) on a black or
white background, at a random position and size, with the caption `a {colour} {shape} on a {background}
background`. Every image follows from (seed, index) alone, drawn with PIL at 4x and reduced (smooth edges),
so a training run, a test and a judge on another machine see the same pictures, and nothing is downloaded.
For ControlNet each sample also has a control image (its outline, as a canny detector would draw it) and a mask
(the region it covers), both from the geometry the image is drawn from, so a judge can check where a model drew.

    python -m toma_export.shapes docs/shapes/samples.png     # one image per caption of the grammar
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from itertools import product

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
RADIUS = (0.16, 0.31)        # the shape's radius (centre to corner), as a share of the image side
SUPERSAMPLE = 4
OUTLINE = 1.5                # the control image's line width in image pixels: 1-2 px lines, as canny gives


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def grammar() -> list[str]:
    """Every caption of the world: 4 colours x 3 shapes x 2 backgrounds = 24."""
    return [caption(c, s, b) for c, s, b in product(COLOURS, SHAPES, BACKGROUNDS)]


def parse(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption of the grammar; ValueError for any other text."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background" or \
            words[1] not in COLOURS or words[2] not in SHAPES or words[5] not in BACKGROUNDS:
        raise ValueError(f"{text!r} is not a caption of the shapes grammar: 'a {{{'|'.join(COLOURS)}}} "
                         f"{{{'|'.join(SHAPES)}}} on a {{{'|'.join(BACKGROUNDS)}}} background'")
    return words[1], words[2], words[5]


@dataclass(frozen=True)
class Sample:
    image: Image.Image        # RGB, size x size
    caption: str
    colour: str
    shape: str
    background: str
    centre: tuple             # (x, y) in pixels
    radius: float             # pixels
    turn: float = 0.0         # radians, triangles only; last and defaulted so Samples built without it still work

    def control(self) -> Image.Image:
        """The ControlNet control image of this sample (see `outline`)."""
        return outline(self.shape, self.centre, self.radius, self.image.width, self.turn)

    def mask(self) -> np.ndarray:
        """The region this sample's shape covers (see `filled`)."""
        return filled(self.shape, self.centre, self.radius, self.image.width, self.turn)


def sample(seed: int, index: int, size: int = 64, colour: str | None = None, shape: str | None = None,
           background: str | None = None) -> Sample:
    """Image `index` of the dataset with this seed; attributes not given are drawn at random (uniformly)."""
    rng = np.random.default_rng([seed, index])
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    background = background or list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = rng.uniform(*RADIUS) * size
    margin = radius + 1
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    turn = rng.uniform(0, 2 * np.pi / 3) if shape == "triangle" else 0.0
    image = draw(shape, COLOURS[colour], BACKGROUNDS[background], centre, radius, size, turn)
    return Sample(image, caption(colour, shape, background), colour, shape, background, centre, radius, turn)


def draw(shape: str, colour, background, centre, radius: float, size: int, turn: float = 0.0) -> Image.Image:
    """One shape: a circle of `radius`, an axis-aligned square whose corners lie at `radius`, or an
    equilateral triangle whose corners lie at `radius` (turned by `turn` radians)."""
    k = SUPERSAMPLE
    big = Image.new("RGB", (size * k, size * k), background)
    _fill(ImageDraw.Draw(big), shape, centre, radius, turn, colour)
    return big.resize((size, size), Image.Resampling.BOX)


def _fill(pen: ImageDraw.ImageDraw, shape: str, centre, radius: float, turn: float, fill) -> None:
    """The shape at SUPERSAMPLE: the one geometry the image, its outline and its mask are all drawn from."""
    k = SUPERSAMPLE
    x, y, r = centre[0] * k, centre[1] * k, radius * k
    if shape == "circle":                  # PIL's boxes include their far edge: one fine pixel less
        pen.ellipse([x - r, y - r, x + r - 1, y + r - 1], fill=fill)
    elif shape == "square":
        half = r / np.sqrt(2)
        pen.rectangle([x - half, y - half, x + half - 1, y + half - 1], fill=fill)
    elif shape == "triangle":
        corners = [(x + r * np.sin(turn + a), y - r * np.cos(turn + a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
        pen.polygon(corners, fill=fill)
    else:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")


def _fine(shape: str, centre, radius: float, size: int, turn: float) -> np.ndarray:
    """The fine pixels `draw` fills, as a boolean array (size * SUPERSAMPLE square)."""
    big = Image.new("L", (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    _fill(ImageDraw.Draw(big), shape, centre, radius, turn, 255)
    return np.asarray(big) > 0


def _near(mask: np.ndarray, reach: float) -> np.ndarray:
    """Pixels within `reach` (a disc, so lines keep their width at every slant) of a True pixel of `mask`."""
    r = int(reach)
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            if dx * dx + dy * dy <= reach * reach:
                out |= padded[r + dy:r + dy + h, r + dx:r + dx + w]
    return out


def outline(shape: str, centre, radius: float, size: int, turn: float = 0.0) -> Image.Image:
    """The ControlNet control image of a shape: its border as white lines OUTLINE px wide on black, RGB, size x
    size, as canny would find it in the drawn image. The line is a band centred on the border of the very fine
    pixels `draw` fills, reduced the same way, so it lies exactly on the drawn shape's edge."""
    inside = _fine(shape, centre, radius, size, turn)
    reach = OUTLINE * SUPERSAMPLE / 2
    band = _near(inside, reach) & _near(~inside, reach)          # fine pixels within reach of both sides
    big = Image.fromarray(band.astype(np.uint8) * 255, mode="L")
    return big.resize((size, size), Image.Resampling.BOX).convert("RGB")


def filled(shape: str, centre, radius: float, size: int, turn: float = 0.0) -> np.ndarray:
    """The region a shape covers, (size, size) bool: the pixels `draw` covers at least half, which a judge
    compares with where a model drew."""
    inside = _fine(shape, centre, radius, size, turn)
    k = SUPERSAMPLE
    return inside.reshape(size, k, size, k).sum((1, 3)) * 2 >= k * k


def batch(seed: int, start: int, count: int, size: int = 64):
    """Images `start`..`start + count` as a float tensor in [-1, 1], (count, 3, size, size), with their
    captions and (colour, shape, background) labels as class indices."""
    import torch

    samples = [sample(seed, i, size) for i in range(start, start + count)]
    pixels = np.stack([np.asarray(s.image) for s in samples]).astype(np.float32) / 127.5 - 1
    labels = torch.tensor([(list(COLOURS).index(s.colour), SHAPES.index(s.shape),
                            list(BACKGROUNDS).index(s.background)) for s in samples])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), [s.caption for s in samples], labels


def control_batch(seed: int, start: int, count: int, size: int = 64):
    """`batch`'s images (float, [-1, 1], (count, 3, size, size)) with what ControlNet training and its judge need:
    the control images as float in [0, 1] (diffusers' convention for conditioning images), the captions, and the
    masks as a (count, size, size) bool array."""
    import torch

    samples = [sample(seed, i, size) for i in range(start, start + count)]
    pixels = np.stack([np.asarray(s.image) for s in samples]).astype(np.float32) / 127.5 - 1
    controls = np.stack([np.asarray(s.control()) for s in samples]).astype(np.float32) / 255
    return (torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(controls).permute(0, 3, 1, 2).contiguous(),
            [s.caption for s in samples], np.stack([s.mask() for s in samples]))


def contact_sheet(seed: int = 0, size: int = 64, scale: int = 2) -> Image.Image:
    """One image per caption of the grammar, in grammar order, 6 per row: the world at a glance."""
    cells = [sample(seed, i, size, *parse(text)).image for i, text in enumerate(grammar())]
    cols, gap = 6, 4
    cell = size * scale
    sheet = Image.new("RGB", (cols * (cell + gap) + gap, (len(cells) // cols) * (cell + gap) + gap), (128, 128, 128))
    for i, image in enumerate(cells):
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST),
                    (gap + (i % cols) * (cell + gap), gap + (i // cols) * (cell + gap)))
    return sheet


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m toma_export.shapes OUT.png")
    from pathlib import Path

    out = Path(sys.argv[1])
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet().save(out, format="PNG")
    print(out)
