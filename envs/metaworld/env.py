"""A Meta-World v3 task as a gymnasium env that speaks the project's observation contract.

Observation: ``{"images": {view: uint8 [h, w, 3]}, "state": float32 [4], "instruction": str}``; ``step``'s info
carries ``success`` and ``task_family``. The episode terminates at the first success and truncates after
``max_steps``.

Three things the raw Meta-World env gets wrong for our use are fixed here:
- seeding: the raw env ignores ``reset(seed=...)``; we unfreeze its random initial state and re-seed its own
  generator, so ``reset(seed=s)`` gives the same object and goal placement every time;
- speed: MuJoCo's default shadows make CPU rendering ~10x slower, so they are switched off before the renderer
  exists (the renderer bakes the quality settings in at creation), and so are reflections;
- orientation: the ``corner*`` cameras are mounted upside down, so their images are rotated by 180 degrees.

Besides Meta-World's own cameras there is one of ours, ``workspace``: a free camera framed on the region where the
MT10 objects and goals are placed. The built-in ``corner`` camera spends most of its pixels on the arm and the
room: at 64 px the 4 cm goal sphere of reach, push and pick-place touches 2-4 pixels there and 6-8 here.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import importlib.util

import gymnasium as gym
import mujoco
import numpy as np

# Mesa's software renderer (llvmpipe, behind EGL and OSMesa) and Triton (pulled in by torch._dynamo, e.g. through
# torchvision.ops) each load their own LLVM; loading Triton's after Mesa has set up its own segfaults the process,
# the other order works. So load Triton's first wherever it is installed (CUDA builds of torch).
if importlib.util.find_spec("triton") is not None:
    import triton._C.libtriton  # noqa: F401

from envs.metaworld.tasks import EMBODIMENT, instruction_for

#: View name (the key in observations and shards: lower case, as shard member names require) -> MuJoCo camera.
CAMERAS = {
    "corner": "corner",
    "corner2": "corner2",
    "corner3": "corner3",
    "corner4": "corner4",
    "topview": "topview",
    "behind_gripper": "behindGripper",
    "gripper_pov": "gripperPOV",
}
UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})


@dataclass(frozen=True)
class FreeCamera:
    """A camera of ours, placed by what it looks at: MuJoCo's free-camera parameters (metres and degrees)."""

    lookat: tuple[float, float, float]
    distance: float
    azimuth: float  # 180 looks along -x, from the robot's right, across the table
    elevation: float  # negative looks down


#: View name -> free camera. ``workspace`` frames x in [-0.3, 0.3], y in [0.4, 0.9], z up to 0.35 (every MT10
#: object, goal and hand position) from the robot's right side, 35 degrees down, so no arm link hides the table.
FREE_CAMERAS = {"workspace": FreeCamera(lookat=(0.0, 0.65, 0.15), distance=0.95, azimuth=160.0, elevation=-35.0)}

#: Meta-World's own episode limit; its env raises if stepped past it.
MAX_PATH_LENGTH = 500


def view_name(view: str) -> str:
    """Our name of a view given either it or Meta-World's camera name (``"gripperPOV"`` -> ``"gripper_pov"``)."""
    if view in CAMERAS or view in FREE_CAMERAS:
        return view
    by_camera = {camera: name for name, camera in CAMERAS.items()}
    if view in by_camera:
        return by_camera[view]
    raise ValueError(f"unknown Meta-World view {view!r}; choose from {list(CAMERAS) + list(FREE_CAMERAS)}")


def _raw_env_class(task: str) -> type:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

    key = f"{task}-goal-observable"
    if key not in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE:
        known = sorted(k.removesuffix("-goal-observable") for k in ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE)
        raise KeyError(f"unknown Meta-World task {task!r}; known v3 tasks: {known}")
    return ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[key]


@dataclass
class VisualRandomization:
    """Per-episode perturbation of the scene's look (the ``sim`` tier's domain randomisation).

    Every reset draws, from the env's seeded generator: a colour gain per geom and per material
    (``1 +- color``), a gain on every light's diffuse and ambient colour (``1 +- light``), and a jitter of every
    camera's position (``+- camera_position`` metres) and orientation (``+- camera_rotation`` degrees).
    Perturbations are applied to the model's defaults, never accumulated.
    """

    color: float = 0.3
    light: float = 0.4
    camera_position: float = 0.03
    camera_rotation: float = 3.0


class MetaWorldEnv(gym.Env):
    """One Meta-World v3 task (e.g. ``"push-v3"``) rendering ``views`` (names from ``CAMERAS``) at ``image_size``."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        task: str,
        image_size: int | tuple[int, int] = 64,
        views: Sequence[str] = ("corner", "gripper_pov"),
        max_steps: int = 300,
        seed: int | None = None,
        visual_randomization: VisualRandomization | None = None,
        render_mode: str | None = "rgb_array",
    ) -> None:
        super().__init__()
        views = tuple(view_name(v) for v in views)
        if not views:
            raise ValueError("MetaWorldEnv needs at least one view")
        if not 1 <= max_steps <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps must be in [1, {MAX_PATH_LENGTH}] (Meta-World's limit), got {max_steps}")
        self.task = task
        self.task_family = task
        self.instruction = instruction_for(task)
        self.embodiment = EMBODIMENT
        self.views = views
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.max_steps = max_steps
        self.visual_randomization = visual_randomization
        self.render_mode = render_mode

        self._raw = _raw_env_class(task)()
        # The goal-observable class freezes one random placement at construction; unfreeze it and draw each
        # placement from the raw env's own generator, which `raw.seed(s)` resets.
        self._raw._freeze_rand_vec = False
        self._raw.seeded_rand_vec = True
        self._pending_seed = seed

        model = self._raw.model
        model.vis.quality.shadowsize = 0
        model.vis.quality.offsamples = 0
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        try:
            self._renderer = mujoco.Renderer(model, self.height, self.width)
        except mujoco.FatalError as e:
            raise RuntimeError(
                f"MuJoCo could not create an offscreen OpenGL context ({e}). Set MUJOCO_GL=egl (or osmesa, with "
                "apt's libosmesa6) in the environment before anything imports mujoco."
            ) from e
        # Reflections re-render the scene once per mirror (the floor and table): ~30% of a CPU render.
        self._renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        self._defaults = {
            name: getattr(model, name).copy()
            for name in ("geom_rgba", "mat_rgba", "light_diffuse", "light_ambient", "cam_pos", "cam_quat")
        }

        self.fps = 1.0 / self._raw.dt
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(4,), dtype=np.float32)
        image = gym.spaces.Box(0, 255, shape=(self.height, self.width, 3), dtype=np.uint8)
        raw_space = self._raw.sawyer_observation_space
        self.observation_space = gym.spaces.Dict(
            {
                "images": gym.spaces.Dict({v: image for v in views}),
                "state": gym.spaces.Box(raw_space.low[:4].astype(np.float32), raw_space.high[:4].astype(np.float32)),  # hand xyz, opening
                "instruction": gym.spaces.Text(max_length=256, charset=string.ascii_lowercase + " "),
            }
        )
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        self._free_cameras = {v: mujoco.MjvCamera() for v in views if v in FREE_CAMERAS}
        self._place_free_cameras()

    @property
    def raw_observation(self) -> np.ndarray:
        """Meta-World's privileged 39-D observation (object and goal poses): what the scripted experts read."""
        if self._raw_obs is None:
            raise RuntimeError("call reset() before reading the observation")
        return self._raw_obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        if seed is None and self._pending_seed is not None:
            seed = self._pending_seed
        self._pending_seed = None
        super().reset(seed=seed)
        if seed is not None:
            self._raw.seed(int(seed))
        self._randomize_visuals()
        self._raw_obs, _ = self._raw.reset()
        self._steps = 0
        return self._observation(), {"success": False, "task_family": self.task}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        if self._raw_obs is None:
            raise RuntimeError("call reset() before step()")
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(4), -1.0, 1.0)
        self._raw_obs, reward, _, _, raw_info = self._raw.step(action)
        self._steps += 1
        success = bool(raw_info["success"])
        info = {k: float(v) for k, v in raw_info.items()}
        info.update(success=success, task_family=self.task)
        return self._observation(), float(reward), success, self._steps >= self.max_steps, info

    def lookahead(self, act: Callable[[np.ndarray], np.ndarray], steps: int) -> np.ndarray:
        """Actions ``act`` would issue over the next ``steps`` steps, found by simulating them without rendering.

        The simulator (MuJoCo state and the raw env's scalar and array bookkeeping) is restored afterwards, so the
        episode continues exactly as if nothing had been simulated. This lets a per-step scripted controller emit
        the action chunk it would have executed, float32 ``[steps, 4]``.
        """
        raw = self._raw
        physics = mujoco.mjtState.mjSTATE_INTEGRATION
        saved_physics = np.empty(mujoco.mj_stateSize(raw.model, physics))
        mujoco.mj_getState(raw.model, raw.data, saved_physics, physics)
        # Everything `step` mutates on the Python side is a number or an array (path length, previous obs,
        # reward normalisers); objects such as spaces and generators are left alone by `step`.
        saved_attrs = {
            k: v.copy() if isinstance(v, np.ndarray) else v
            for k, v in vars(raw).items()
            if isinstance(v, (np.ndarray, np.generic, int, float, bool))
        }
        obs = self.raw_observation
        actions = []
        try:
            for k in range(steps):
                actions.append(np.clip(np.asarray(act(obs), dtype=np.float32), -1.0, 1.0))
                if k + 1 < steps and raw.curr_path_length < MAX_PATH_LENGTH:
                    obs, *_ = raw.step(actions[-1])
        finally:
            vars(raw).update(saved_attrs)
            mujoco.mj_setState(raw.model, raw.data, saved_physics, physics)
            mujoco.mj_forward(raw.model, raw.data)
        return np.stack(actions)

    def render(self) -> np.ndarray:
        """All views side by side, uint8 ``[h, w * V, 3]``."""
        return np.concatenate([self._render_view(v) for v in self.views], axis=1)

    def close(self) -> None:
        self._renderer.close()
        self._raw.close()

    def _observation(self) -> dict[str, Any]:
        return {
            "images": {v: self._render_view(v) for v in self.views},
            "state": self._raw_obs[:4].astype(np.float32),
            "instruction": self.instruction,
        }

    def _render_view(self, view: str) -> np.ndarray:
        camera = self._free_cameras[view] if view in self._free_cameras else CAMERAS[view]
        self._renderer.update_scene(self._raw.data, camera=camera)
        image = self._renderer.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if view in UPSIDE_DOWN_CAMERAS else image.copy()

    def _place_free_cameras(self, rng: np.random.Generator | None = None) -> None:
        """Set our free cameras to their poses, jittered like the built-in cameras when ``rng`` is given."""
        r = self.visual_randomization
        for view, camera in self._free_cameras.items():
            pose = FREE_CAMERAS[view]
            camera.type = mujoco.mjtCamera.mjCAMERA_FREE
            camera.lookat[:] = pose.lookat
            camera.distance, camera.azimuth, camera.elevation = pose.distance, pose.azimuth, pose.elevation
            if rng is not None and r is not None:
                camera.lookat[:] += rng.uniform(-r.camera_position, r.camera_position, size=3)
                camera.azimuth += rng.uniform(-r.camera_rotation, r.camera_rotation)
                camera.elevation += rng.uniform(-r.camera_rotation, r.camera_rotation)

    def _randomize_visuals(self) -> None:
        model, d = self._raw.model, self._defaults
        for name, default in d.items():
            getattr(model, name)[:] = default
        r = self.visual_randomization
        if r is None:
            return
        rng = self.np_random
        self._place_free_cameras(rng)

        def gain(n: int, amplitude: float) -> np.ndarray:
            return rng.uniform(1 - amplitude, 1 + amplitude, size=(n, 3))

        model.geom_rgba[:, :3] = np.clip(d["geom_rgba"][:, :3] * gain(model.ngeom, r.color), 0, 1)
        model.mat_rgba[:, :3] = np.clip(d["mat_rgba"][:, :3] * gain(model.nmat, r.color), 0, 1)
        model.light_diffuse[:] = np.clip(d["light_diffuse"] * gain(model.nlight, r.light), 0, 1)
        model.light_ambient[:] = np.clip(d["light_ambient"] * gain(model.nlight, r.light), 0, 1)
        model.cam_pos[:] = d["cam_pos"] + rng.uniform(-r.camera_position, r.camera_position, size=(model.ncam, 3))
        for i in range(model.ncam):
            axis = rng.normal(size=3)
            angle = np.deg2rad(rng.uniform(-r.camera_rotation, r.camera_rotation))
            turn = np.empty(4)
            mujoco.mju_axisAngle2Quat(turn, axis / np.linalg.norm(axis), angle)
            mujoco.mju_mulQuat(model.cam_quat[i], d["cam_quat"][i], turn)


def make_env(task: str, seed: int, **kwargs: Any) -> MetaWorldEnv:
    """``make_env(task, seed)`` for ``vla_zoo.evaluation.evaluate_closed_loop``; kwargs go to ``MetaWorldEnv``."""
    return MetaWorldEnv(task, seed=seed, **kwargs)
