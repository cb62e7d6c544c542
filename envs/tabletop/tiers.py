"""The five tiers of the data pyramid, each generated as a stream of ``datamodules.episode.Episode``.

=========  ===============  ==============================================================  ===========
tier       embodiment       what                                                            actions
=========  ===============  ==============================================================  ===========
robot      point_gripper    clean expert demos, default visuals (the scarce real data)      yes
robot_b    two_link_arm     clean expert demos of the second robot                          yes
sim        point_gripper    domain-randomised visuals; half clean, half noisy experts       yes
human      human            a drawn hand and forearm doing the same tasks at varying speed   no (video)
neural     point_gripper    robot episodes with generative-video artefacts (blur, noise,     no (video)
                            colour shift, dropped / repeated / shifted frames)
=========  ===============  ==============================================================  ===========

Every tier keeps successful episodes only (an imitation corpus of demonstrations): an episode index whose attempt
fails is retried with the next attempt seed, and ``metadata`` records ``success`` (always True), ``attempt``,
``noise``, ``task_family``, ``seed`` (the world seed: ``TabletopEnv.reset(seed=...)`` rebuilds the same scene) and,
for ``neural``, the artefact parameters. Episode ``i`` depends only on ``(seed, tier, i)``, never on how a range
of episodes is split across processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from datamodules.episode import Episode

from .experts import ScriptedExpert
from .world import VIEWS, WRIST_WINDOW, Renderer, World, make_world

FPS = 10.0
MAX_STEPS = 100  # an expert episode takes ~25-45 steps; one that has not succeeded by then is retried
MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Tier:
    robot: str  # embodiment whose dynamics drive the episode
    embodiment: str  # what the episode is recorded as (``Episode.embodiment``)
    visuals: str
    noise_levels: tuple[float, ...]  # expert noise, one drawn per episode
    actionless: bool
    artefacts: bool = False


TIERS: dict[str, Tier] = {
    "robot": Tier("point_gripper", "point_gripper", "default", (0.0,), actionless=False),
    "robot_b": Tier("two_link_arm", "two_link_arm", "default", (0.0,), actionless=False),
    "sim": Tier("point_gripper", "point_gripper", "randomised", (0.0, 0.0, 0.25, 0.5), actionless=False),
    "human": Tier("point_gripper", "human", "human", (0.15,), actionless=True),
    "neural": Tier("point_gripper", "point_gripper", "default", (0.0,), actionless=True, artefacts=True),
}
_TIER_CODES = {name: i for i, name in enumerate(TIERS)}


def episode_seed(seed: int, tier: str, index: int, attempt: int = 0) -> int:
    """World seed of one episode attempt: a hash of its coordinates, so ranges can be generated anywhere."""
    words = np.random.SeedSequence([seed, _TIER_CODES[tier], index, attempt]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def rollout(world: World, expert: ScriptedExpert, renderer: Renderer | None = None, max_steps: int = MAX_STEPS):
    """Run the expert until success or ``max_steps``. Returns ``(frames, states, actions, success)``; the last
    recorded step is the first successful frame with a hold action (no motion, gripper unchanged)."""
    frames: dict[str, list[np.ndarray]] = {v: [] for v in VIEWS}
    states, actions = [], []
    for _ in range(max_steps + 1):
        if renderer is not None:
            for view, image in renderer(world).items():
                frames[view].append(image)
        states.append(world.state())
        if world.success:
            actions.append(np.array([0.0, 0.0, float(world.grip)], np.float32))
            return frames, np.stack(states), np.stack(actions), True
        if len(actions) == max_steps:
            break
        action = expert.act(world)
        actions.append(action)
        world.step(action)
    frames = {view: images[:-1] for view, images in frames.items()}
    return frames, np.stack(states[:-1]), np.stack(actions), False


def generate_episodes(
    tier: str, num_episodes: int, seed: int, image_size: int = 64, start: int = 0, wrist_window: float = WRIST_WINDOW
) -> Iterator[Episode]:
    """Episodes ``start .. start + num_episodes - 1`` of ``tier`` (see the module table), the wrist camera seeing
    ``wrist_window`` table units."""
    if tier not in TIERS:
        raise ValueError(f"Unknown tabletop tier {tier!r}; choose one of {list(TIERS)}")
    spec = TIERS[tier]
    renderer = Renderer(image_size, wrist_window)
    for index in range(start, start + num_episodes):
        for attempt in range(MAX_ATTEMPTS):
            world_seed = episode_seed(seed, tier, index, attempt)
            world = make_world(world_seed, spec.robot, spec.visuals)
            run_seq, artefact_seq = np.random.SeedSequence([world_seed, 1]).spawn(2)
            run_rng = np.random.default_rng(run_seq)
            noise = float(spec.noise_levels[run_rng.integers(len(spec.noise_levels))])
            if spec.embodiment == "human":  # people move at their own pace
                world.robot.max_step = world.robot.ee_speed = float(run_rng.uniform(0.02, 0.04))
            expert = ScriptedExpert(noise=noise, seed=run_rng.integers(2**63))
            frames, states, actions, success = rollout(world, expert, renderer)
            if success:
                break
        else:
            raise RuntimeError(f"tier {tier!r} episode {index}: the expert failed {MAX_ATTEMPTS} attempts in a row")
        video = {view: np.stack(images) for view, images in frames.items()}
        metadata = {
            "tier": tier,
            "index": index,
            "attempt": attempt,
            "seed": world_seed,
            "task_family": world.scene.family,
            "success": success,
            "noise": noise,
            "visuals": spec.visuals,
        }
        if spec.artefacts:
            video, artefacts = apply_artefacts(video, np.random.default_rng(artefact_seq))
            metadata["artefacts"] = artefacts
        yield Episode(
            frames=video,
            instruction=world.scene.instruction,
            embodiment=spec.embodiment,
            fps=FPS,
            state=None if spec.actionless else states,
            actions=None if spec.actionless else actions,
            metadata=metadata,
        )


def _blur(video: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the two image axes of ``[T, h, w, 3]``."""
    taps = np.arange(-2, 3)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    for axis in (1, 2):
        pad = [(0, 0)] * video.ndim
        pad[axis] = (2, 2)
        padded = np.pad(video, pad, mode="edge")
        n = video.shape[axis]
        video = sum(k * padded.take(np.arange(i, i + n), axis=axis) for i, k in enumerate(kernel))
    return video


def apply_artefacts(video: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    """Corrupt a clean episode the way a video generation model would: blur, sensor-like noise, a global colour
    shift, and temporal jitter (dropped and repeated frames) plus occasional one-pixel spatial jumps. The same
    corruption applies to every view."""
    length = len(next(iter(video.values())))
    keep = []
    for t in range(length):
        u = rng.random()
        if 0 < t < length - 1 and u < 0.1:
            continue  # dropped frame
        keep.append(t)
        if u > 0.9:
            keep.append(t)  # repeated frame
    params = {
        "blur_sigma": float(rng.uniform(0.4, 1.2)),
        "noise_std": float(rng.uniform(2.0, 10.0)),
        "gain": rng.uniform(0.85, 1.15, 3).round(4).tolist(),
        "bias": rng.normal(0.0, 8.0, 3).round(3).tolist(),
        "dropped": length - len(set(keep)),
        "repeated": len(keep) - len(set(keep)),
    }
    shifts = rng.integers(-1, 2, size=(len(keep), 2)) * (rng.random((len(keep), 1)) < 0.25)
    out = {}
    for view, frames in video.items():
        x = _blur(frames[keep].astype(np.float32), params["blur_sigma"])
        x = x * np.asarray(params["gain"], np.float32) + np.asarray(params["bias"], np.float32)
        x += rng.normal(0.0, params["noise_std"], x.shape).astype(np.float32)
        for t, (dy, dx) in enumerate(shifts):
            if dy or dx:
                x[t] = np.roll(x[t], (int(dy), int(dx)), axis=(0, 1))
        out[view] = np.clip(x, 0, 255).astype(np.uint8)
    return out, params
