"""Pixels of the demo world: backgrounds, the ten objects and the ten motions, drawn with numpy.

A step is drawn all at once: every per-frame quantity (centre, angle, scale, split) is a vector
over the step's frames, and masks are evaluated on a [frames, H, W] grid, so a 90-frame step at
112 pixels costs a few dozen array operations. Coordinates are in units of the frame height:
y in [0, 1] downwards, x in [0, width / height].

Objects are drawn in their own frame (u, v) in [-1, 1]^2; every object carries an off-centre
highlight so that rotations of round shapes are visible. What a step does to an object lasts
(`Thing`): a cut tomato stays in halves, a shrunk onion small, a mashed potato flat, a flipped
fish dark side up, and each object's next step starts where its last one left it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vbert_jax.demo.world import words


@dataclasses.dataclass(frozen=True)
class Look:
  shape: str
  colour: tuple[int, int, int]
  texture: str


LOOKS: dict[str, Look] = {
    "tomato": Look("circle", (220, 35, 35), "plain"),
    "egg": Look("egg", (245, 240, 225), "plain"),
    "carrot": Look("carrot", (245, 130, 20), "cross_stripes"),
    "bread": Look("rounded_square", (205, 160, 100), "dots"),
    "cheese": Look("triangle", (250, 215, 40), "holes"),
    "cucumber": Look("capsule", (30, 110, 50), "long_stripes"),
    "onion": Look("circle", (140, 50, 160), "rings"),
    "potato": Look("blob", (115, 75, 40), "speckles"),
    "lemon": Look("lens", (170, 220, 40), "pores"),
    "fish": Look("fish", (80, 130, 210), "scales"),
}
assert set(LOOKS) == set(words.NOUNS)

KNIFE = np.array([70, 70, 80], np.float32) / 255
WOOD = np.array([160, 110, 60], np.float32) / 255
STEEL = np.array([90, 90, 100], np.float32) / 255
BOWL = np.array([225, 225, 230], np.float32) / 255
BOARD = np.array([196, 190, 178], np.float32) / 255
POT = np.array([55, 55, 62], np.float32) / 255
PLATE = np.array([240, 240, 240], np.float32) / 255
PAN = np.array([25, 25, 25], np.float32) / 255
GLASS = np.array([170, 200, 215], np.float32) / 255
SPATULA = np.array([205, 205, 190], np.float32) / 255
STEEL_POT = np.array([150, 150, 162], np.float32) / 255


def _smooth(x: np.ndarray) -> np.ndarray:
  x = np.clip(x, 0.0, 1.0)
  return x * x * (3 - 2 * x)


# ------------------------------------------------------------------------------------- shapes


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Inside test in the object's own frame; the shapes fill roughly [-1, 1]^2."""
  if shape == "circle":
    return u * u + v * v <= 1.0
  if shape == "egg":
    w = 0.72 * (1.0 + 0.18 * v)
    # w is 0 only at v = -5.6, far outside the shape: the inf or nan there compares False.
    with np.errstate(divide="ignore", invalid="ignore"):
      return (u / w) ** 2 + v * v <= 1.0
  if shape == "carrot":
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 0.3 * (1.0 - u) + 0.08)
  if shape == "rounded_square":
    return u ** 4 + v ** 4 <= 0.8
  if shape == "triangle":
    return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.55)
  if shape == "capsule":
    au = np.abs(u)
    return (np.abs(v) <= 0.38) & ((au <= 0.62) | ((au - 0.62) ** 2 + v * v <= 0.38 ** 2))
  if shape == "blob":
    theta = np.arctan2(v, u)
    radius = 0.82 + 0.12 * np.sin(3 * theta + 0.5) + 0.06 * np.cos(5 * theta)
    return u * u + v * v <= radius * radius
  if shape == "lens":
    return np.abs(v) <= 0.62 * (1.0 - u * u)
  if shape == "fish":
    body = ((u + 0.2) / 0.8) ** 2 + (v / 0.48) ** 2 <= 1.0
    tail = (u >= 0.5) & (u <= 1.0) & (np.abs(v) <= (u - 0.5) * 1.1)
    return body | tail
  raise ValueError(f"unknown shape {shape!r}")


def texture_shade(texture: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """A brightness multiplier around 1 that gives each noun its surface."""
  if texture == "plain":
    return np.ones_like(u)
  if texture == "cross_stripes":
    return np.where(np.sin(u * 22.0) > 0.55, 0.72, 1.0)
  if texture == "long_stripes":
    return np.where(np.sin(v * 30.0) > 0.2, 1.35, 1.0)
  if texture == "dots":
    return np.where(np.sin(u * 14.0) * np.sin(v * 14.0) > 0.7, 0.62, 1.0)
  if texture == "holes":
    d = (np.mod(u * 2.6 + 0.3, 1.0) - 0.5) ** 2 + (np.mod(v * 2.6 + 0.7, 1.0) - 0.5) ** 2
    return np.where(d < 0.05, 0.55, 1.0)
  if texture == "rings":
    return np.where(np.sin(np.sqrt(u * u + v * v) * 20.0) > 0.3, 1.3, 0.9)
  if texture == "speckles":
    return np.where(np.sin(u * 37.0 + 3.0 * np.sin(v * 11.0)) * np.sin(v * 41.0) > 0.8, 0.6, 1.0)
  if texture == "pores":
    return 0.95 + 0.08 * np.sin(u * 45.0) * np.sin(v * 45.0)
  if texture == "scales":
    return np.where(np.sin(u * 12.0 + v * 12.0) * np.sin(u * 12.0 - v * 12.0) > 0.0, 1.2, 0.9)
  raise ValueError(f"unknown texture {texture!r}")


# -------------------------------------------------------------------------------- backgrounds


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A kitchen-ish surface (wood, tiles, cloth, marble or plain), lit unevenly, and a prop."""
  y, x = _grid(height, width)
  y, x = y[0], x[0]
  kind = rng.choice(["wood", "tiles", "cloth", "marble", "plain"])
  # Muted surfaces, so that the object and its motion, not the table, dominate a clip.
  grey = rng.uniform(0.35, 0.75)
  base = np.clip(grey + rng.uniform(-0.12, 0.12, size=3), 0, 1).astype(np.float32)
  other = np.clip(base + rng.uniform(-0.07, 0.07, size=3), 0.05, 0.95).astype(np.float32)
  if kind == "wood":
    f = rng.uniform(6, 14)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (y * f + 0.15 * np.sin(2 * np.pi * x * rng.uniform(1, 3))))
  elif kind == "tiles":
    k = rng.integers(3, 7)
    t = ((np.mod(x * k, 1.0) < 0.07) | (np.mod(y * k, 1.0) < 0.07)).astype(np.float32)
  elif kind == "cloth":
    k = rng.integers(4, 9)
    t = np.mod(np.floor(x * k) + np.floor(y * k), 2).astype(np.float32)
  elif kind == "marble":
    t = np.zeros_like(x)
    for _ in range(4):
      fx, fy, ph = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
      t = t + np.sin(2 * np.pi * (fx * x + fy * y) + ph)
    t = 0.5 + 0.5 * np.tanh(t)
  else:
    t = np.zeros_like(x)
  img = base * (1 - t[..., None]) + other * t[..., None]
  direction = rng.uniform(0, 2 * np.pi)
  light = 0.85 + 0.3 * (np.cos(direction) * x + np.sin(direction) * y - 0.5)
  img = img * light[..., None] * rng.uniform(0.9, 1.1)
  if rng.random() < 0.6:  # a plate or a board that never moves
    cx, cy, r = rng.uniform(0.2, x.max() - 0.2), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.3)
    if rng.random() < 0.5:
      prop = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    else:
      prop = (np.abs(x - cx) <= r * 1.3) & (np.abs(y - cy) <= r * 0.8)
    img = np.where(prop[..., None], np.clip(base + rng.uniform(-0.08, 0.08, size=3), 0, 1), img)
  return np.clip(img, 0, 1).astype(np.float32)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  y = ((np.arange(height, dtype=np.float32) + 0.5) / height)[None, :, None]
  x = ((np.arange(width, dtype=np.float32) + 0.5) / height)[None, None, :]
  return y, x


# ------------------------------------------------------------------------------------- things


@dataclasses.dataclass(frozen=True)
class Thing:
  """What lasts of an object from one of its steps to the next: its place (frame-height units),
  size, orientation and tint, and what has been done to it."""
  x: float
  y: float
  r: float
  angle: float
  tint: float
  split: float = 0.0  # half-distance between its halves once cut, object units
  scale: float = 1.0  # below 1 once shrunk
  flat: float = 0.0  # 0 round to 1 pressed flat; mashing leaves it at 0.6
  side: float = 1.0  # -1 once flipped: the darker underside up


def place(rng: np.random.Generator, height: int, width: int) -> Thing:
  """An object's first appearance: a random size, place, angle and tint."""
  aspect = width / height
  r = float(rng.uniform(0.25, 0.32))
  margin = r + 0.06
  x = float(rng.uniform(margin, max(margin, aspect - margin)))
  y = float(rng.uniform(0.3 + r / 2, 0.7))
  return Thing(x=x, y=y, r=r, angle=float(rng.uniform(-0.5, 0.5)),
               tint=float(rng.uniform(0.92, 1.05)))


# How far a slide may take an object's centre from the frame's side: partly out of the frame,
# as real hands do, and where its next step finds it.
SLIDE_EDGE = 0.2


def _clamp_place(thing: Thing, x: float, y: float, aspect: float) -> tuple[float, float]:
  """Where the next step finds it: within the frame's sides, in the band objects start in."""
  return (float(np.clip(x, SLIDE_EDGE, max(SLIDE_EDGE, aspect - SLIDE_EDGE))),
          float(np.clip(y, 0.3 + thing.r / 2, 0.7)))


# ------------------------------------------------------------------------------------ motions


@dataclasses.dataclass
class Pose:
  """Per-frame object pose; every field is a [frames] vector."""
  cx: np.ndarray
  cy: np.ndarray
  angle: np.ndarray
  sx: np.ndarray
  sy: np.ndarray
  split: np.ndarray  # half-distance between the two halves of a cut object, object units


@dataclasses.dataclass
class Layer:
  """A flat-coloured shape drawn over the object (knife, spoon, stream...) or under it (bowl)."""
  mask: np.ndarray  # [frames, H, W] bool
  colour: np.ndarray  # [3] in [0, 1]
  above: bool = True


def _segment_mask(y, x, x0, y0, x1, y1, width) -> np.ndarray:
  """Pixels within `width` of the segments (x0, y0)-(x1, y1), one per frame."""
  x0, y0, x1, y1 = (a[:, None, None] for a in (x0, y0, x1, y1))
  dx, dy = x1 - x0, y1 - y0
  t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
  return (x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2 <= width * width


def motion(verb: str, p: np.ndarray, seconds: np.ndarray, thing: Thing, speed: float,
           direction: int, aspect: float, y, x) -> tuple[Pose, list[Layer], Thing]:
  """The pose over a step's frames for one verb, the tools it shows, and the object after it.

  p is the step's progress in [0, 1) per frame, `seconds` the time since the step began.
  """
  n = len(p)
  x0, y0, r = thing.x, thing.y, thing.r
  zero = np.zeros(n, np.float32)
  cx, cy, angle, split = x0 + zero, y0 + zero, zero.copy(), thing.split + zero
  size, side, flat = thing.scale + zero, thing.side + zero, thing.flat + zero
  centre = x0  # of the kitchenware the step happens in
  layers: list[Layer] = []
  if verb == "slide":  # a slow sweep across the surface, once or there and back
    to = x0 + (0.45 if x0 < aspect / 2 else -0.45) * aspect
    to = float(np.clip(to, SLIDE_EDGE, max(SLIDE_EDGE, aspect - SLIDE_EDGE)))
    cx = x0 + (to - x0) * 0.5 * (1 - np.cos(np.pi * p * (1 if speed < 1.1 else 2)))
  elif verb == "drop":  # falls in from above, lands and bounces
    drops = 1 if speed < 1.1 else 2
    q = np.mod(p * drops, 1.0)
    fall = np.minimum(q / 0.55, 1.0) ** 2
    bounce = np.where((q > 0.55) & (q < 0.8), 0.12 * np.sin(np.pi * (q - 0.55) / 0.25), 0.0)
    cy = (-r) + (y0 + r) * fall - bounce
    angle = direction * 0.6 * (1 - fall)
  elif verb == "spin":
    angle = direction * 2 * np.pi * (0.8 + 0.7 * speed) * p
  elif verb == "cut":  # a knife comes down through the middle, then the halves part
    knife_tip = y0 - 1.6 * r + 3.2 * r * np.minimum(p / 0.35, 1.0)
    lift = np.where(p > 0.35, _smooth((p - 0.35) / 0.2) * 1.8 * r, 0.0)
    top = y0 - 2.6 * r - lift
    layers.append(Layer(_segment_mask(y, x, cx, top, cx, knife_tip - lift, 0.03), KNIFE))
    split = np.minimum(thing.split + 0.5 * _smooth((p - 0.35) / 0.45), 1.0)
  elif verb == "shrink":  # to about half its size, and it stays so
    size = thing.scale * (1.0 - 0.5 * _smooth(p * speed))
  elif verb == "shake":  # fast, small jitter, a few times a second
    f = 3.5 + 1.5 * speed
    cx = cx + 0.07 * np.sin(2 * np.pi * f * seconds)
    cy = cy + 0.04 * np.sin(2 * np.pi * f * 1.3 * seconds + 1.0)
    angle = 0.25 * np.sin(2 * np.pi * f * 0.7 * seconds)
  elif verb == "pour":  # tilts over a bowl and a stream runs down into it
    tilt = _smooth(p / 0.3) * (1.0 - _smooth((p - 0.85) / 0.15))
    angle = direction * 1.9 * tilt
    cy = y0 - 0.12 * tilt
    tip_x = cx + direction * r * 0.9
    flowing = (tilt > 0.9)[:, None, None]
    stream_top = cy + 0.05
    stream = (np.abs(x - tip_x[:, None, None]) <= 0.02) & (y >= stream_top[:, None, None]) & (
        y <= 0.88) & (np.sin(2 * np.pi * (y * 9 - seconds[:, None, None] * 2.5 * speed)) > -0.4)
    bowl = ((x - tip_x[:, None, None]) / 0.2) ** 2 + ((y - 0.9) / 0.1) ** 2 <= 1.0
    layers.append(Layer(np.broadcast_to(bowl, (n,) + bowl.shape[1:]), BOWL, above=False))
    layers.append(Layer(stream & flowing, None))  # coloured like the object, set by the caller
  elif verb == "flip":  # turns over about its horizontal axis, showing its darker underside
    flips = 1 if speed < 1.1 else 2
    side = thing.side * np.cos(np.pi * flips * _smooth(p))
    cy = y0 - 0.1 * np.abs(np.sin(np.pi * flips * _smooth(p)))
  elif verb == "stir":  # goes round in circles with a spoon in it
    phase = 2 * np.pi * (1.0 + 0.6 * speed) * p * direction
    centre = x0 - 0.14
    cx = centre + 0.14 * np.cos(phase)
    cy = y0 + 0.08 * np.sin(phase)
    layers.append(Layer(_segment_mask(y, x, cx, cy, cx + 0.18, cy - 0.4, 0.022), WOOD))
  elif verb == "mash":  # a masher presses down, once or a few times, and leaves it flat
    presses = 1 + int(speed > 0.9) + int(speed > 1.3)
    flat = np.maximum(np.abs(np.sin(np.pi * presses * p)),
                      np.maximum(thing.flat, 0.6 * _smooth(p)))
    cy = y0 + r * size * 0.55 * (flat - thing.flat)
    plate_y = cy - r * size * (1.0 - 0.55 * flat) - 0.03
    layers.append(Layer(_segment_mask(y, x, cx - 1.2 * r, plate_y, cx + 1.2 * r, plate_y, 0.02),
                        STEEL))
    layers.append(Layer(_segment_mask(y, x, cx, plate_y, cx, plate_y - 0.5, 0.015), STEEL))
  else:
    raise ValueError(f"unknown verb {verb!r}; expected one of {words.VERBS}")
  f32 = lambda a: np.asarray(a, np.float32) + zero
  layers = _setting(verb, f32(cx), f32(cy), centre, y0, r, aspect, y, x) + layers
  sx, sy = size * (1.0 + 0.4 * flat), side * size * (1.0 - 0.55 * flat)
  pose = Pose(f32(cx), f32(cy), f32(angle), f32(sx), f32(sy), f32(split))
  end_x, end_y = _clamp_place(thing, float(pose.cx[-1]), float(pose.cy[-1]), aspect)
  after = dataclasses.replace(
      thing, x=end_x, y=end_y, angle=thing.angle + float(pose.angle[-1]),
      split=float(split[-1]), scale=max(float(size[-1]), 0.3),
      flat=max(thing.flat, 0.6) if verb == "mash" else thing.flat,
      side=float(np.sign(pose.sy[-1]) or 1.0))
  return pose, layers, after


def _setting(verb: str, cx, cy, x0: float, y0: float, r: float, aspect: float, y, x
             ) -> list[Layer]:
  """The kitchenware each action happens with (a board to cut on, a pot to drop into...)."""
  n = len(cx)
  fixed = lambda m: np.broadcast_to(m, (n,) + m.shape[1:])
  cx3, cy3 = cx[:, None, None], cy[:, None, None]
  if verb == "slide":  # a long board along the path
    return [Layer(fixed((np.abs(y - y0) <= 1.25 * r) & (np.abs(x - aspect / 2) <= aspect * 0.46)),
                  BOARD, above=False)]
  if verb == "drop":  # the front of a pot it falls into
    return [Layer(fixed((np.abs(x - x0) <= 1.3 * r) & (y >= y0 + 0.55 * r)), POT)]
  if verb == "spin":  # a round plate
    return [Layer(fixed((x - x0) ** 2 + (y - y0) ** 2 <= (1.35 * r) ** 2), PLATE, above=False)]
  if verb == "cut":  # a square chopping board
    return [Layer(fixed((np.abs(x - x0) <= 1.5 * r) & (np.abs(y - y0) <= 1.5 * r)), BOARD,
                  above=False)]
  if verb == "shrink":  # a black pan with a handle
    pan = (x - x0) ** 2 + (y - y0) ** 2 <= (1.4 * r) ** 2
    handle = (np.abs(y - y0) <= 0.2 * r) & (x >= x0) & (x <= x0 + 2.6 * r)
    return [Layer(fixed(pan | handle), PAN, above=False)]
  if verb == "shake":  # a glass jar shaken with it
    outer = (np.abs(x - cx3) <= 1.35 * r) & (np.abs(y - cy3) <= 1.35 * r)
    inner = (np.abs(x - cx3) <= 1.2 * r) & (np.abs(y - cy3) <= 1.2 * r)
    return [Layer(outer & ~inner, GLASS)]
  if verb == "flip":  # a spatula underneath
    blade = (np.abs(x - cx3) <= 1.1 * r) & (np.abs(y - cy3 - 1.1 * r) <= 0.12 * r)
    handle = _segment_mask(y, x, cx - 0.4 * r, cy + 1.1 * r, cx - 2.6 * r, cy + 1.9 * r, 0.025)
    return [Layer(blade | handle, SPATULA)]
  if verb == "stir":  # a steel pot seen from above
    return [Layer(fixed((x - x0) ** 2 + (y - y0) ** 2 <= (1.6 * r) ** 2), STEEL_POT,
                  above=False)]
  return []


# ------------------------------------------------------------------------------------- a step


def render_step(bg: np.ndarray, verb: str, noun: str, num_frames: int, fps: float,
                rng: np.random.Generator, speed: float = 1.0, thing: Thing | None = None
                ) -> tuple[np.ndarray, Thing]:
  """[num_frames, H, W, 3] uint8 frames of `verb` applied to `noun` over the background `bg`,
  and the object after it. `thing`: the object as its last step left it (None: placed anew)."""
  height, width = bg.shape[:2]
  aspect = width / height
  look = LOOKS[noun]
  y, x = _grid(height, width)
  thing = thing or place(rng, height, width)
  r = thing.r
  direction = int(rng.choice([-1, 1]))
  colour = np.clip(np.array(look.colour, np.float32) / 255 * thing.tint, 0, 1)
  seconds = np.arange(num_frames, dtype=np.float32) / fps
  p = (np.arange(num_frames, dtype=np.float32) + 0.5) / num_frames
  pose, layers, after = motion(verb, p, seconds, thing, speed, direction, aspect, y, x)

  e = lambda a: a[:, None, None]
  dx, dy = x - e(pose.cx), y - e(pose.cy)
  c, s = np.cos(e(pose.angle + thing.angle)), np.sin(e(pose.angle + thing.angle))
  u0, v0 = (c * dx + s * dy) / r, (-s * dx + c * dy) / r
  sy_safe = np.where(np.abs(pose.sy) < 0.04, 0.04, np.abs(pose.sy))
  v = v0 / e(sy_safe) * e(np.sign(pose.sy) + (pose.sy == 0))
  if np.any(pose.split > 0):  # in halves: being cut, or cut before
    ul, ur = (u0 + e(pose.split)) / e(pose.sx), (u0 - e(pose.split)) / e(pose.sx)
    left = shape_mask(look.shape, ul, v) & (ul < 0)
    right = shape_mask(look.shape, ur, v) & (ur >= 0)
    mask, u = left | right, np.where(left, ul, ur)
    inner = (np.abs(u) < 0.12) & e(pose.split > 0.02)  # the exposed cut face is paler
  else:
    u = u0 / e(pose.sx)
    mask = shape_mask(look.shape, u, v)
    inner = None
  # Shading is computed only where the object is (a fifth of the pixels or less).
  uu, vv = u[mask], v[mask]
  underside = np.broadcast_to(e(pose.sy) < 0, mask.shape)[mask]
  shade = texture_shade(look.texture, uu, vv) * (1.05 - 0.2 * (uu * uu + vv * vv))
  shade = np.where(underside, 0.6 * shade, shade)
  obj = colour * shade[:, None].astype(np.float32)
  highlight = (uu + 0.35) ** 2 + (vv + 0.4) ** 2 < 0.05
  obj[highlight] = 0.45 * obj[highlight] + 0.55
  if inner is not None:
    cut_face = inner[mask]
    obj[cut_face] = 0.5 * obj[cut_face] + 0.45

  frames = np.empty((num_frames,) + bg.shape, np.float32)
  frames[:] = bg
  for layer in (l for l in layers if not l.above):
    frames[layer.mask] = layer.colour
  frames[mask] = obj
  for layer in (l for l in layers if l.above):
    frames[layer.mask] = colour * 0.9 if layer.colour is None else layer.colour
  return (np.clip(frames, 0, 1) * 255 + 0.5).astype(np.uint8), after
