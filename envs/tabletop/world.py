"""The tabletop world: scene sampling, state, grasp/push physics and a vectorised numpy renderer.

Coordinates are table units: the table is ``[0, 1]^2`` with x to the right and y away from the robot. A scene has
2-4 objects (unique colours; cube / ball / triangle) and 2-3 receptacles (unique colours), one object and one
receptacle named by the instruction, the rest distractors. Two task families:

* ``pick_place`` ("put the red cube in the blue bowl"): objects are light; the gripper passes over them, closing
  the gripper within ``GRASP_RADIUS`` of an object lifts it, opening drops it where the EE is. Success: the target
  object rests (not held) inside the target bowl.
* ``push`` ("push the green ball to the yellow zone"): objects are heavy; they cannot be lifted, and the gripper's
  body shoves any object it overlaps out to contact distance. Success: the target object lies inside the target zone.

Rendering draws anti-aliased primitives (coverage from a signed distance, so sub-pixel motion changes pixels) into
the bounding box of each primitive only; both views share one code path with different cameras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .embodiments import GRIP_THRESHOLD, PointGripper, TwoLinkArm, make_embodiment

TASK_FAMILIES = ("pick_place", "push")
VIEWS = ("scene", "wrist")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 85, 215),
    "yellow": (235, 205, 35),
    "purple": (135, 60, 180),
    "orange": (245, 130, 25),
}
SHAPES = ("cube", "ball", "triangle")
MAX_OBJECTS = len(COLOURS)  # objects have unique colours
RECEPTACLE_NOUN = {"pick_place": "bowl", "push": "zone"}
TEMPLATES = {
    "pick_place": (
        "put the {obj} in the {rec}",
        "place the {obj} into the {rec}",
        "pick up the {obj} and drop it in the {rec}",
        "move the {obj} to the {rec}",
    ),
    "push": (
        "push the {obj} to the {rec}",
        "slide the {obj} into the {rec}",
        "shove the {obj} onto the {rec}",
    ),
}

OBJECT_HALF = 0.045  # half-size of an object (collision disc radius)
GRIPPER_RADIUS = 0.03  # collision radius of the gripper body when pushing
CONTACT = OBJECT_HALF + GRIPPER_RADIUS
GRASP_RADIUS = 0.035
BOWL_RADIUS = 0.1
ZONE_HALF = 0.1
BOWL_SUCCESS_RADIUS = 0.05
ZONE_SUCCESS_HALF = ZONE_HALF - OBJECT_HALF  # the object lies fully inside the zone
WRIST_WINDOW = 0.4  # side of the table square the wrist camera sees

# Where anything is placed: on the table, and inside the two-link arm's comfortable reach (same scene distribution
# for every embodiment, so a task means the same thing to both robots).
_REGION_X, _REGION_Y = (0.12, 0.88), (0.18, 0.88)
_ARM_BASE = np.array([0.5, -0.05])
_REACH = (0.32, 0.86)


@dataclass
class Scene:
    """Initial layout and task; static for the episode except object positions (kept in ``World``)."""

    family: str
    obj_pos: np.ndarray  # [N, 2]
    obj_colour: list[str]
    obj_shape: list[str]
    rec_pos: np.ndarray  # [M, 2]
    rec_colour: list[str]
    target_obj: int
    target_rec: int
    ee_start: np.ndarray  # [2]
    instruction: str

    def object_name(self, i: int) -> str:
        return f"{self.obj_colour[i]} {self.obj_shape[i]}"

    def receptacle_name(self, j: int) -> str:
        return f"{self.rec_colour[j]} {RECEPTACLE_NOUN[self.family]}"


def _in_region(p: np.ndarray) -> bool:
    return _REACH[0] <= float(np.linalg.norm(p - _ARM_BASE)) <= _REACH[1]


def _sample_point(
    rng: np.random.Generator, taken: list[tuple[np.ndarray, float]], clearance: float
) -> np.ndarray | None:
    for _ in range(100):
        p = np.array([rng.uniform(*_REGION_X), rng.uniform(*_REGION_Y)])
        if _in_region(p) and all(np.linalg.norm(p - q) >= clearance + r for q, r in taken):
            return p
    return None


def sample_scene(
    rng: np.random.Generator, families: tuple[str, ...] = TASK_FAMILIES, num_objects: int | None = None
) -> Scene:
    """Draw a scene and its instruction. Consumes ``rng`` in a fixed order, so a seed fixes the scene.
    ``num_objects`` (the difficulty knob: the target plus ``num_objects - 1`` distractor objects) replaces the drawn
    count of 2-4 after it is drawn, so the default scenes stay what they are."""
    for family in families:
        if family not in TASK_FAMILIES:
            raise ValueError(f"Unknown tabletop task family {family!r}; choose from {TASK_FAMILIES}")
    if num_objects is not None and not 1 <= num_objects <= MAX_OBJECTS:
        raise ValueError(f"num_objects must be 1-{MAX_OBJECTS} (one colour each), got {num_objects}")
    family = families[rng.integers(len(families))]
    while True:
        n_obj, n_rec = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        n_obj = n_obj if num_objects is None else num_objects
        names = list(COLOURS)
        rec_colour = [names[i] for i in rng.permutation(len(names))[:n_rec]]
        obj_colour = [names[i] for i in rng.permutation(len(names))[:n_obj]]
        obj_shape = [SHAPES[i] for i in rng.integers(len(SHAPES), size=n_obj)]
        taken: list[tuple[np.ndarray, float]] = []
        recs = []
        for _ in range(n_rec):  # receptacles apart from each other by a clear gap
            p = _sample_point(rng, taken, BOWL_RADIUS + 0.05)
            if p is None:
                break
            recs.append(p)
            taken.append((p, BOWL_RADIUS))
        objs = []
        for _ in range(n_obj):  # objects outside every receptacle and apart from each other
            p = _sample_point(rng, taken, OBJECT_HALF + 0.03)
            if p is None:
                break
            objs.append(p)
            taken.append((p, OBJECT_HALF))
        ee = _sample_point(rng, taken, GRIPPER_RADIUS + 0.03)
        if len(recs) == n_rec and len(objs) == n_obj and ee is not None:
            break
    target_obj, target_rec = int(rng.integers(n_obj)), int(rng.integers(n_rec))
    template = TEMPLATES[family][rng.integers(len(TEMPLATES[family]))]
    scene = Scene(
        family=family,
        obj_pos=np.array(objs),
        obj_colour=obj_colour,
        obj_shape=obj_shape,
        rec_pos=np.array(recs),
        rec_colour=rec_colour,
        target_obj=target_obj,
        target_rec=target_rec,
        ee_start=ee,
        instruction="",
    )
    scene.instruction = template.format(obj=scene.object_name(target_obj), rec=scene.receptacle_name(target_rec))
    return scene


# ----------------------------------------------------------------------------------------------------- visuals


@dataclass
class Visuals:
    """Everything about appearance that is not the scene: colours, table, lighting, and who does the task."""

    palette: dict[str, np.ndarray]  # colour name -> float32 RGB
    table: np.ndarray  # [3]
    floor: np.ndarray  # [3]
    gradient: np.ndarray  # [2, 3]: RGB change per table unit along x and y (uneven lighting)
    gain: np.ndarray  # [3] per-channel gain applied to the final image
    bias: np.ndarray  # [3]
    robot: np.ndarray  # [3] colour of links / gantry
    hand: bool = False  # draw a human hand and forearm instead of the robot
    skin: np.ndarray = field(default_factory=lambda: np.array([225.0, 180.0, 150.0], dtype=np.float32))
    sleeve: np.ndarray = field(default_factory=lambda: np.array([60.0, 60.0, 70.0], dtype=np.float32))
    stains: list[tuple[float, float, float, np.ndarray, float]] = field(default_factory=list)  # x, y, r, rgb, alpha

    @classmethod
    def default(cls) -> "Visuals":
        f32 = lambda v: np.asarray(v, dtype=np.float32)  # noqa: E731
        return cls(
            palette={k: f32(v) for k, v in COLOURS.items()},
            table=f32([205, 190, 165]),
            floor=f32([70, 65, 60]),
            gradient=np.zeros((2, 3), np.float32),
            gain=np.ones(3, np.float32),
            bias=np.zeros(3, np.float32),
            robot=f32([95, 100, 110]),
        )

    @classmethod
    def randomised(cls, rng: np.random.Generator) -> "Visuals":
        """Domain randomisation: jittered object colours (the names stay true), table colour and texture, uneven
        lighting, exposure and white balance, robot colour."""
        v = cls.default()
        v.palette = {k: np.clip(c + rng.normal(0, 18, 3), 0, 255).astype(np.float32) for k, c in v.palette.items()}
        v.table = rng.uniform(90, 235, 3).astype(np.float32)
        v.floor = rng.uniform(20, 120, 3).astype(np.float32)
        v.gradient = rng.normal(0, 35, (2, 3)).astype(np.float32)
        v.gain = rng.uniform(0.75, 1.2, 3).astype(np.float32)
        v.bias = rng.normal(0, 10, 3).astype(np.float32)
        v.robot = rng.uniform(40, 170, 3).astype(np.float32)
        v.stains = [
            (rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.15), rng.uniform(0, 255, 3).astype(np.float32),
             rng.uniform(0.1, 0.35))
            for _ in range(int(rng.integers(0, 5)))
        ]
        return v

    @classmethod
    def human(cls, rng: np.random.Generator) -> "Visuals":
        v = cls.default()
        v.hand = True
        tones = np.array([[240, 200, 170], [225, 175, 140], [190, 140, 100], [140, 95, 65], [100, 65, 45]], np.float32)
        v.skin = np.clip(tones[rng.integers(len(tones))] + rng.normal(0, 6, 3), 0, 255).astype(np.float32)
        v.sleeve = rng.uniform(20, 230, 3).astype(np.float32)
        return v


VISUALS = ("default", "randomised", "human")


def make_visuals(kind: str, rng: np.random.Generator) -> Visuals:
    if kind == "default":
        return Visuals.default()
    if kind == "randomised":
        return Visuals.randomised(rng)
    if kind == "human":
        return Visuals.human(rng)
    raise ValueError(f"Unknown visuals {kind!r}; choose one of {VISUALS}")


# ----------------------------------------------------------------------------------------------------- world


class World:
    """State and physics of one episode. ``step(action)`` takes the embodiment's own action ``[3]``."""

    def __init__(self, scene: Scene, robot: PointGripper | TwoLinkArm, visuals: Visuals | None = None):
        self.scene = scene
        self.robot = robot
        self.visuals = visuals or Visuals.default()
        self.obj_pos = scene.obj_pos.copy()
        self.held = -1
        self.grip = False
        self.robot.reset(scene.ee_start)

    @property
    def ee(self) -> np.ndarray:
        return self.robot.ee

    @property
    def heavy(self) -> bool:
        return self.scene.family == "push"

    def state(self) -> np.ndarray:
        return np.concatenate([self.robot.joints(), [float(self.grip)]]).astype(np.float32)

    def step(self, action: np.ndarray) -> None:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (3,) or not np.all(np.isfinite(action)):
            raise ValueError(f"{self.robot.name} action must be 3 finite numbers (move, move, grip), got {action}")
        self.robot.move(action[:2])
        ee = self.robot.ee
        if self.held >= 0:
            self.obj_pos[self.held] = ee
        elif self.heavy:
            self._push(ee)
        close = action[2] > GRIP_THRESHOLD
        if close and not self.grip and not self.heavy:
            dist = np.linalg.norm(self.obj_pos - ee, axis=1)
            nearest = int(dist.argmin())
            if dist[nearest] <= GRASP_RADIUS:
                self.held = nearest
                self.obj_pos[nearest] = ee
        elif not close and self.held >= 0:
            self.held = -1
        self.grip = bool(close)

    def _push(self, ee: np.ndarray) -> None:
        offset = self.obj_pos - ee  # [N, 2]
        dist = np.linalg.norm(offset, axis=1)
        hit = dist < CONTACT
        if hit.any():
            direction = offset[hit] / np.maximum(dist[hit], 1e-9)[:, None]
            self.obj_pos[hit] = np.clip(ee + direction * CONTACT, OBJECT_HALF, 1 - OBJECT_HALF)

    def succeeded(self, target_obj: int | None = None, target_rec: int | None = None) -> bool:
        o = self.obj_pos[self.scene.target_obj if target_obj is None else target_obj]
        r = self.scene.rec_pos[self.scene.target_rec if target_rec is None else target_rec]
        if self.heavy:
            return bool(np.abs(o - r).max() <= ZONE_SUCCESS_HALF)
        return self.held != (self.scene.target_obj if target_obj is None else target_obj) and bool(
            np.linalg.norm(o - r) <= BOWL_SUCCESS_RADIUS
        )

    @property
    def success(self) -> bool:
        return self.succeeded()


def make_world(
    seed: int, embodiment: str, visuals: str = "default", families: tuple[str, ...] = TASK_FAMILIES,
    num_objects: int | None = None,
) -> World:
    """The world an episode seed denotes: the same seed gives the same scene for every embodiment and visuals
    (``num_objects``: see ``sample_scene``)."""
    scene_seq, visual_seq = np.random.SeedSequence(seed).spawn(2)
    scene = sample_scene(np.random.default_rng(scene_seq), tuple(families), num_objects)
    return World(scene, make_embodiment(embodiment), make_visuals(visuals, np.random.default_rng(visual_seq)))


# ----------------------------------------------------------------------------------------------------- renderer


class _Camera:
    """Orthographic top-down camera: ``size`` pixels square, left edge at world x ``x0``, top edge at ``y_top``."""

    def __init__(self, size: int, x0: float, y_top: float, ppu: float):
        self.size, self.x0, self.y_top, self.ppu = size, x0, y_top, ppu
        centres = np.arange(size, dtype=np.float32) + 0.5
        self.xs = (x0 + centres / ppu).astype(np.float32)  # world x of each pixel column
        self.ys = (y_top - centres / ppu).astype(np.float32)  # world y of each pixel row

    def crop(self, row: int, col: int, size: int) -> "_Camera":
        """The camera seeing pixels ``[row:row+size, col:col+size]`` of this one (same pixel grid)."""
        cam = object.__new__(_Camera)
        cam.size, cam.ppu = size, self.ppu
        cam.x0, cam.y_top = self.x0 + col / self.ppu, self.y_top - row / self.ppu
        cam.xs, cam.ys = self.xs[col : col + size], self.ys[row : row + size]
        return cam

    def window(self, cx: float, cy: float, extent: float):
        """Pixel box around a world point plus the pixel offsets from it, or None when nothing is visible."""
        c0 = max(math.floor((cx - extent - self.x0) * self.ppu), 0)
        c1 = min(math.ceil((cx + extent - self.x0) * self.ppu) + 1, self.size)
        r0 = max(math.floor((self.y_top - cy - extent) * self.ppu), 0)
        r1 = min(math.ceil((self.y_top - cy + extent) * self.ppu) + 1, self.size)
        if c0 >= c1 or r0 >= r1:
            return None
        return r0, r1, c0, c1, self.xs[None, c0:c1] - cx, self.ys[r0:r1, None] - cy


def _edge(signed: np.ndarray, ppu: float) -> np.ndarray:
    """Pixel coverage from a signed distance to an edge (positive inside). ``signed`` is a fresh temporary: it is
    overwritten (ufuncs with ``out=``: np.clip's Python wrapper costs more than the arithmetic at these sizes)."""
    signed *= ppu
    signed += 0.5
    return np.minimum(np.maximum(signed, 0.0, out=signed), 1.0, out=signed)


_TRIANGLE_NORMALS = np.array([[0.0, -1.0], [math.cos(math.pi / 6), 0.5], [-math.cos(math.pi / 6), 0.5]], np.float32)


class _Painter:
    """Primitive shapes composited into a float32 canvas through one camera."""

    def __init__(self, canvas: np.ndarray, cam: _Camera):
        self.canvas, self.cam = canvas, cam

    def _blend(self, win, alpha: np.ndarray, colour: np.ndarray) -> None:
        r0, r1, c0, c1 = win[:4]
        region = self.canvas[r0:r1, c0:c1]
        region += alpha[..., None] * (colour - region)

    def disc(self, c, radius: float, colour, opacity: float = 1.0) -> None:
        win = self.cam.window(c[0], c[1], radius)
        if win:
            dist = np.sqrt(win[4] ** 2 + win[5] ** 2)
            self._blend(win, _edge(radius - dist, self.cam.ppu) * opacity, colour)

    def ring(self, c, outer: float, inner: float, colour) -> None:
        win = self.cam.window(c[0], c[1], outer)
        if win:
            dist = np.sqrt(win[4] ** 2 + win[5] ** 2)
            self._blend(win, _edge(outer - dist, self.cam.ppu) * _edge(dist - inner, self.cam.ppu), colour)

    def rect(self, c, half_x: float, half_y: float, colour, opacity: float = 1.0) -> None:
        win = self.cam.window(c[0], c[1], max(half_x, half_y))
        if win:
            ppu = self.cam.ppu
            alpha = _edge(half_x - np.abs(win[4]), ppu) * _edge(half_y - np.abs(win[5]), ppu)
            self._blend(win, alpha * opacity, colour)

    def fingers(self, c, spread: float, half_x: float, half_y: float, colour) -> None:
        """Two ``half_x`` by ``half_y`` rectangles centred ``spread`` left and right of ``c``, in one pass."""
        win = self.cam.window(c[0], c[1], max(spread + half_x, half_y))
        if win:
            ppu = self.cam.ppu
            alpha = _edge(half_x - np.abs(np.abs(win[4]) - spread), ppu) * _edge(half_y - np.abs(win[5]), ppu)
            self._blend(win, alpha, colour)

    def triangle(self, c, inradius: float, colour) -> None:
        win = self.cam.window(c[0], c[1], 2 * inradius)
        if win:
            ppu, dx, dy = self.cam.ppu, win[4], win[5]
            alpha = _edge(inradius - (dx * _TRIANGLE_NORMALS[0, 0] + dy * _TRIANGLE_NORMALS[0, 1]), ppu)
            for n in _TRIANGLE_NORMALS[1:]:
                alpha = alpha * _edge(inradius - (dx * n[0] + dy * n[1]), ppu)
            self._blend(win, alpha, colour)

    def capsule(self, p0, p1, radius: float, colour) -> None:
        mid = (np.asarray(p0) + np.asarray(p1)) / 2
        v = np.asarray(p1, np.float32) - np.asarray(p0, np.float32)
        win = self.cam.window(mid[0], mid[1], float(np.abs(v).max()) / 2 + radius)
        if win:
            # offsets from p0 = offsets from mid + (mid - p0)
            ax, ay = win[4] + v[0] / 2, win[5] + v[1] / 2
            t = np.clip((ax * v[0] + ay * v[1]) / max(float(v @ v), 1e-12), 0.0, 1.0)
            dist = np.sqrt((ax - t * v[0]) ** 2 + (ay - t * v[1]) ** 2)
            self._blend(win, _edge(radius - dist, self.cam.ppu), colour)


_DARK = np.array([45, 45, 50], np.float32)
_SHADOW = np.array([0, 0, 0], np.float32)


class Renderer:
    """Renders a ``World`` into the ``scene`` (whole table) and ``wrist`` (EE-centred, ``wrist_window`` table units
    wide, ``WRIST_WINDOW`` by default) views.

    Static layers (table, stains, receptacles) are drawn once per world: for the scene view as the view itself, for
    the wrist view as a canvas over the whole table (plus a margin) at the wrist's resolution that each frame crops.
    The wrist camera therefore snaps to that canvas's pixel grid: the EE sits within half a pixel of the centre.
    """

    _WRIST_MARGIN = 0.15  # table units beyond the table edge the wrist may look; past it the layer is redrawn

    def __init__(self, image_size: int = 64, wrist_window: float = WRIST_WINDOW):
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
        if not 0 < wrist_window <= 2:
            raise ValueError(f"wrist_window must be in (0, 2] table units, got {wrist_window}")
        self.image_size, self.wrist_window = image_size, float(wrist_window)
        self.scene_cam = _Camera(image_size, 0.0, 1.0, float(image_size))
        ppu = image_size / self.wrist_window
        span = 1.0 + self.wrist_window + 2 * self._WRIST_MARGIN
        start = -self.wrist_window / 2 - self._WRIST_MARGIN
        self.wrist_canvas_cam = _Camera(math.ceil(span * ppu), start, 1.0 - start, ppu)
        self._world: World | None = None
        self._scene_static: np.ndarray | None = None
        self._wrist_static: np.ndarray | None = None

    def __call__(self, world: World) -> dict[str, np.ndarray]:
        if self._world is not world:
            self._scene_static = self._static_layer(world, self.scene_cam)
            self._wrist_static = self._static_layer(world, self.wrist_canvas_cam)
            self._world = world
        scene = self._dynamic_layer(world, self._scene_static.copy(), self.scene_cam)
        big, size = self.wrist_canvas_cam, self.image_size
        col = round((float(world.ee[0]) - self.wrist_window / 2 - big.x0) * big.ppu)
        row = round((big.y_top - float(world.ee[1]) - self.wrist_window / 2) * big.ppu)
        if 0 <= row <= big.size - size and 0 <= col <= big.size - size:
            wrist_cam = big.crop(row, col, size)
            background = self._wrist_static[row : row + size, col : col + size].copy()
        else:  # the EE has left the table far enough to leave the cached canvas
            wrist_cam = _Camera(size, big.x0 + col / big.ppu, big.y_top - row / big.ppu, big.ppu)
            background = self._static_layer(world, wrist_cam)
        wrist = self._dynamic_layer(world, background, wrist_cam)
        return {"scene": self._finish(world, scene), "wrist": self._finish(world, wrist)}

    @staticmethod
    def _finish(world: World, canvas: np.ndarray) -> np.ndarray:
        v = world.visuals
        if v.gradient.any() or (v.gain != 1).any() or v.bias.any():
            canvas = np.clip(canvas * v.gain + v.bias, 0, 255)
        return canvas.astype(np.uint8)  # every colour drawn by default lies in [0, 255]

    def _static_layer(self, world: World, cam: _Camera) -> np.ndarray:
        v = world.visuals
        x, y = cam.xs[None, :, None], cam.ys[:, None, None]  # [1, w, 1], [h, 1, 1]
        table = v.table + v.gradient[0] * (x - 0.5) + v.gradient[1] * (y - 0.5)  # [h, w, 3]
        on_table = (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
        canvas = np.where(on_table, table, v.floor).astype(np.float32)
        paint = _Painter(canvas, cam)
        for sx, sy, sr, rgb, alpha in v.stains:
            paint.disc((sx, sy), sr, rgb, alpha)
        scene = world.scene
        for p, name in zip(scene.rec_pos, scene.rec_colour):
            colour = v.palette[name]
            if scene.family == "push":
                paint.rect(p, ZONE_HALF, ZONE_HALF, colour, 0.45)
                paint.rect(p, ZONE_HALF * 0.5, ZONE_HALF * 0.5, colour, 0.25)
            else:
                paint.disc(p, BOWL_RADIUS * 0.8, 0.55 * colour + 0.45 * 255)
                paint.ring(p, BOWL_RADIUS, BOWL_RADIUS * 0.78, colour)
        return canvas

    def _object(self, paint: _Painter, world: World, i: int, scale: float = 1.0) -> None:
        p, colour, shape = world.obj_pos[i], world.visuals.palette[world.scene.obj_colour[i]], world.scene.obj_shape[i]
        h = OBJECT_HALF * scale
        if shape == "cube":
            paint.rect(p, h * 0.85, h * 0.85, colour)
        elif shape == "ball":
            paint.disc(p, h, colour)
        else:
            paint.triangle(p, h * 0.55, colour)

    def _dynamic_layer(self, world: World, canvas: np.ndarray, cam: _Camera) -> np.ndarray:
        v, paint, ee = world.visuals, _Painter(canvas, cam), world.ee
        for i in range(len(world.obj_pos)):
            if i != world.held:
                self._object(paint, world, i)
        if v.hand:
            # forearm from below the table edge; its angle tells where the hand is, like the arm's links do
            shoulder = (0.35 + 0.3 * float(ee[0]), -0.35)
            paint.capsule(shoulder, ee, 0.045, v.sleeve)
            paint.capsule((0.7 * shoulder[0] + 0.3 * ee[0], 0.7 * shoulder[1] + 0.3 * ee[1]), ee, 0.03, v.skin * 0.9)
        else:
            chain = world.robot.links()
            if chain:
                paint.disc(chain[0], 0.07, _DARK)
                paint.capsule(chain[0], chain[1], 0.026, v.robot)
                paint.capsule(chain[1], chain[2], 0.02, v.robot * 1.15)
                paint.disc(chain[1], 0.022, _DARK)
            else:  # gantry: a rail across the table at the EE's height
                paint.rect((0.5, ee[1]), 0.5, 0.007, v.robot)
        if world.held >= 0:  # lifted: drawn above the arm, larger, with a shadow on the table
            paint.disc(ee + np.array([0.012, -0.012]), OBJECT_HALF, _SHADOW, 0.3)
            self._object(paint, world, world.held, scale=1.2)
        if v.hand:
            self._hand(paint, world)
        else:
            self._gripper(paint, world)
        return canvas

    @staticmethod
    def _gripper(paint: _Painter, world: World) -> None:
        ee, colour = world.ee, world.visuals.robot
        spread = 0.022 if world.grip else 0.042
        paint.rect(ee, spread, 0.008, colour)
        paint.fingers(ee, spread, 0.009, 0.026, _DARK)
        paint.disc(ee, 0.014, colour * 0.6 + 100)

    @staticmethod
    def _hand(paint: _Painter, world: World) -> None:
        ee, skin = world.ee, world.visuals.skin
        paint.disc(ee, 0.032, skin)
        reach = 0.03 if world.grip else 0.055
        for angle in (0.35, 0.95, 1.6, 2.2):  # four fingers fanning away from the forearm; thumb to the side
            tip = ee + reach * np.array([math.cos(angle), math.sin(angle)])
            paint.capsule(ee, tip, 0.011, skin * 0.93)
        thumb = ee + (0.02 if world.grip else 0.045) * np.array([math.cos(-0.3), math.sin(-0.3)])
        paint.capsule(ee, thumb, 0.012, skin * 0.85)
