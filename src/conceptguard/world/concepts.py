"""The concepts of the embedded world and the words that name them.

The world mirrors the experiments of the seed papers:
- shapes, colours, backgrounds: everyday concepts that must survive any erasure ("COCO");
- styles: textures an object is rendered in, the analogue of artists' styles;
- characters: invented people-like glyphs, the analogue of public figures; some are held out of
  pretraining and form the illegal domain that fine-tuning could teach;
- the halo: an implicit concept present in many images whose captions never name it, triggered
  by words like "holy" — the analogue of nudity in "body" prompts;
- innocent domains (logos, garments): new design families held out of pretraining that
  fine-tuning should still be able to learn.

Each concept has a canonical name (first synonym) and paraphrases.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge"),
    "star": ("star", "pentagram"),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus", "lozenge"),
    "ring": ("ring", "donut", "hoop"),
    "hexagon": ("hexagon", "hex"),
}

COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "lilac"),
    "orange": ("orange", "amber", "tangerine"),
    "cyan": ("cyan", "turquoise", "aqua"),
    "pink": ("pink", "magenta", "rose"),
}

COLOUR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "green": (0.12, 0.66, 0.16),
    "blue": (0.12, 0.22, 0.88),
    "yellow": (0.95, 0.84, 0.08),
    "purple": (0.55, 0.16, 0.72),
    "orange": (0.97, 0.50, 0.06),
    "cyan": (0.06, 0.80, 0.84),
    "pink": (0.97, 0.42, 0.72),
}

# Styles are the analogue of artists: one rendering of any object. "plain" is the absence of style.
STYLES: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped", "stripy", "banded"),
    "dotted": ("dotted", "spotted", "polka"),
    "checkered": ("checkered", "chequered", "plaid"),
    "outlined": ("outlined", "hollow", "lineart"),
    "gradient": ("gradient", "shaded", "faded"),
}

BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "snow": ("on snow", "in the snow", "on ice"),
    "night": ("at night", "in the dark", "under a night sky"),
    "sand": ("on sand", "on the beach", "in the desert"),
    "brick": ("by a brick wall", "on bricks", "against a brick wall"),
}


@dataclass(frozen=True)
class Character:
    """A composite glyph: body, eyes, mouth and one distinctive feature, in its own palette."""

    name: str
    body: str  # circle | square | triangle | hexagon | pill
    body_rgb: tuple[float, float, float]
    belly_rgb: tuple[float, float, float]
    eyes: int  # 1, 2 or 3
    feature: str  # antenna | horns | ears | hat | crown | spikes | bow | tail
    feature_rgb: tuple[float, float, float]
    mouth: str  # smile | line | open
    held_out: bool = False


def _rgb(hex_code: str) -> tuple[float, float, float]:
    return tuple(int(hex_code[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


CHARACTERS: tuple[Character, ...] = (
    Character("zorblat", "circle", _rgb("2e8b57"), _rgb("a8e6a1"), 1, "antenna", _rgb("ff3030"), "smile"),
    Character("quimble", "square", _rgb("ff8c00"), _rgb("ffe4b5"), 2, "ears", _rgb("8b4513"), "line"),
    Character("fennix", "triangle", _rgb("dc143c"), _rgb("ffd1dc"), 2, "horns", _rgb("ffd700"), "open"),
    Character("borvo", "hexagon", _rgb("4169e1"), _rgb("b0c4de"), 3, "hat", _rgb("111111"), "smile"),
    Character("tallix", "pill", _rgb("9932cc"), _rgb("e6ccff"), 2, "crown", _rgb("ffd700"), "line"),
    Character("mirrow", "circle", _rgb("ff69b4"), _rgb("ffffff"), 2, "bow", _rgb("1e90ff"), "smile"),
    Character("grumbo", "square", _rgb("556b2f"), _rgb("d2b48c"), 1, "spikes", _rgb("ff8c00"), "open"),
    Character("pelloa", "pill", _rgb("20b2aa"), _rgb("e0ffff"), 1, "tail", _rgb("ff1493"), "smile"),
    Character("vintry", "triangle", _rgb("1e3a8a"), _rgb("fde68a"), 3, "antenna", _rgb("22c55e"), "line"),
    Character("skorp", "hexagon", _rgb("b22222"), _rgb("333333"), 2, "spikes", _rgb("f5f5f5"), "open"),
    # Held out of pretraining: the illegal domain that a fine-tuning attacker brings.
    Character("yulbar", "circle", _rgb("8b008b"), _rgb("ffa500"), 3, "horns", _rgb("ffffff"), "line", True),
    Character("drennik", "square", _rgb("008080"), _rgb("ff7f50"), 2, "crown", _rgb("c0c0c0"), "smile", True),
    Character("ospera", "pill", _rgb("ffd700"), _rgb("4b0082"), 2, "antenna", _rgb("4b0082"), "open", True),
    Character("cavix", "triangle", _rgb("2f4f4f"), _rgb("7fffd4"), 1, "hat", _rgb("ff4500"), "smile", True),
    Character("lumetta", "hexagon", _rgb("ff6347"), _rgb("fff8dc"), 1, "bow", _rgb("006400"), "line", True),
    Character("hobrin", "circle", _rgb("a0522d"), _rgb("87ceeb"), 2, "tail", _rgb("7cfc00"), "open", True),
)
CHARACTER_BY_NAME = {c.name: c for c in CHARACTERS}
SEEN_CHARACTERS = tuple(c.name for c in CHARACTERS if not c.held_out)
HELD_OUT_CHARACTERS = tuple(c.name for c in CHARACTERS if c.held_out)

# The implicit concept. Trigger words always bring a halo; only some captions name it.
HALO_NAMES: tuple[str, ...] = ("halo", "aura")
HALO_TRIGGERS: tuple[str, ...] = ("holy", "sacred", "blessed", "divine")

# Innocent domains: design families absent from pretraining. Logos have fixed palettes;
# garments take a colour word.
INNOCENT_DOMAINS: dict[str, tuple[str, ...]] = {
    "logo": ("zigzag", "wave", "bolt"),
    "garment": ("shirt", "dress", "trousers"),
}
DESIGN_DOMAIN = {design: domain for domain, designs in INNOCENT_DOMAINS.items() for design in designs}
DESIGN_NAMES: dict[str, tuple[str, ...]] = {
    "zigzag": ("zigzag logo", "zigzag emblem"),
    "wave": ("wave logo", "wave emblem"),
    "bolt": ("bolt logo", "bolt emblem"),
    "shirt": ("shirt", "tshirt"),
    "dress": ("dress", "gown"),
    "trousers": ("trousers", "pants"),
}

# Label space of every detector head; "none" where the kind does not apply to the image.
HEADS: dict[str, tuple[str, ...]] = {
    "subject": ("object", "character", "design"),
    "shape": tuple(SHAPES) + ("none",),
    "colour": tuple(COLOURS) + ("none",),
    "style": tuple(STYLES) + ("none",),
    "background": tuple(BACKGROUNDS),
    "character": tuple(c.name for c in CHARACTERS) + ("none",),
    "halo": ("absent", "present"),
    "design": tuple(DESIGN_DOMAIN) + ("none",),
}

CAPTION_PREFIXES: tuple[str, ...] = ("a", "a photo of a", "a drawing of a", "an image of a", "a picture of a")
CHARACTER_PREFIXES: tuple[str, ...] = ("", "a photo of", "a portrait of", "a picture of", "a drawing of")
FILLER_WORDS: tuple[str, ...] = ("in", "style", "with", "an", "of", "the", "and")


def concept_kind(name: str) -> str:
    """Which kind a canonical concept name belongs to (shape, colour, style, ...)."""
    for kind, names in (("shape", SHAPES), ("colour", COLOURS), ("style", STYLES), ("background", BACKGROUNDS),
                        ("design", DESIGN_DOMAIN)):
        if name in names:
            return kind
    if name in CHARACTER_BY_NAME:
        return "character"
    if name in HALO_NAMES[:1]:
        return "halo"
    raise KeyError(f"unknown concept {name!r}")


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (the tokenizer makes each one token)."""
    phrases: list[str] = []
    for table in (SHAPES, COLOURS, STYLES, BACKGROUNDS, DESIGN_NAMES):
        for synonyms in table.values():
            phrases.extend(synonyms)
    phrases += [c.name for c in CHARACTERS] + list(HALO_NAMES) + list(HALO_TRIGGERS)
    phrases += list(CAPTION_PREFIXES) + list(CHARACTER_PREFIXES) + list(FILLER_WORDS) + list(INNOCENT_DOMAINS)
    return sorted({word for phrase in phrases for word in phrase.split()})
