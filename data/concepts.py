"""What the built-in synthetic dataset depicts: colours, shapes and caption templates.

Kept apart from the renderer so that the tokenizer-training script and the tests can read the
vocabulary without pulling in image code. Colours are far apart in RGB and shapes differ in
silhouette even at 32 px (a flat bar instead of a square, which a tiny ViT confused with the
circle), so a tiny CLIP can separate all 30 classes within minutes on CPU.
"""

from __future__ import annotations

# name -> base RGB; each sample jitters it slightly (see synthetic.py)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 175, 40),
    "blue": (35, 65, 230),
    "yellow": (240, 220, 25),
    "purple": (145, 40, 200),
    "cyan": (30, 215, 225),
}

SHAPES: tuple[str, ...] = ("circle", "bar", "triangle", "cross", "ring")

SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "", "large": "large"}

# Each caption names the colour and the shape; {size} may be empty, {bg} is "dark"/"light".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {size} {colour} {shape}",
    "a {colour} {shape}",
    "{colour} {shape} on a {bg} background",
    "a picture of a {colour} {shape}",
    "an image showing a {size} {colour} {shape}",
    "a {size} {colour} {shape} on a {bg} background",
    "there is a {colour} {shape} in this picture",
    "a drawing of a {colour} {shape}",
    "the {shape} is {colour}",
    "a {colour} coloured {shape} somewhere in the frame",
    "a noisy photo of a {colour} {shape}",
    "one {colour} {shape} against a {bg} backdrop",
    "this is a photo of a {colour} {shape}.",
    "a simple {colour} {shape} shape",
    "{colour} {shape}",
)


def class_names() -> list[str]:
    """The 30 class names in label order: colour-major ("red circle", "red square", ...)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def folder_name(classname: str) -> str:
    """ImageFolder directory for a class: the class name with spaces replaced by '_'."""
    return classname.replace(" ", "_")
