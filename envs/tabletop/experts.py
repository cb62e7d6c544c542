"""Scripted experts: closed-loop controllers that read the world's privileged state.

An expert decides where the end-effector should go next (a displacement in table units) and whether the gripper
should be closed; the embodiment turns the displacement into its own action (``command_for``), so one controller
serves every robot. ``noise`` adds Gaussian noise (in action units, before clipping) to the movement dims; the
controller re-plans every step, so noisy experts still mostly succeed, but along perturbed, recovering paths.
"""

from __future__ import annotations

import math

import numpy as np

from .embodiments import MODALITIES
from .world import CONTACT, World

_REACHED = 0.012  # close the gripper this near the object
_DROP = 0.015  # open it this near the bowl centre
_PUSH_DONE = 0.02


def _towards(ee: np.ndarray, goal: np.ndarray, max_step: float) -> np.ndarray:
    delta = goal - ee
    norm = float(np.linalg.norm(delta))
    return delta if norm <= max_step else delta * (max_step / norm)


class ScriptedExpert:
    """Solves the world's task, or the task ``target = (object index, receptacle index)`` when given (used to show
    that following a different instruction fails)."""

    def __init__(self, noise: float = 0.0, seed: int | np.random.SeedSequence | None = None,
                 target: tuple[int, int] | None = None):
        self.noise = float(noise)
        self.rng = np.random.default_rng(seed)
        self.target = target

    def act(self, world: World) -> np.ndarray:
        obj, rec = self.target if self.target is not None else (world.scene.target_obj, world.scene.target_rec)
        if world.heavy:
            displacement, grip = self._push(world, obj, rec), 0.0
        else:
            displacement, grip = self._pick_place(world, obj, rec)
        command = world.robot.command_for(displacement)
        if self.noise > 0:
            command = np.clip(command + self.rng.normal(0.0, self.noise, 2), -1.0, 1.0)
        return np.array([command[0], command[1], grip], dtype=np.float32)

    def _pick_place(self, world: World, obj: int, rec: int) -> tuple[np.ndarray, float]:
        ee, zero, speed = world.ee, np.zeros(2), world.robot.ee_speed
        if world.held == obj:
            goal = world.scene.rec_pos[rec]
            if np.linalg.norm(goal - ee) < _DROP:
                return zero, 0.0
            return _towards(ee, goal, speed), 1.0
        if world.held >= 0:  # holding the wrong object: drop it
            return zero, 0.0
        target = world.obj_pos[obj]
        if np.linalg.norm(target - ee) < _REACHED and not world.grip:
            return zero, 1.0
        return _towards(ee, target, speed), 0.0  # also re-opens after a missed grasp

    def _push(self, world: World, obj: int, rec: int) -> np.ndarray:
        ee, o, goal, speed = world.ee, world.obj_pos[obj], world.scene.rec_pos[rec], world.robot.ee_speed
        to_goal = goal - o
        remaining = float(np.linalg.norm(to_goal))
        if remaining < _PUSH_DONE:
            return np.zeros(2)
        u = to_goal / remaining
        rel = ee - o
        dist = float(np.linalg.norm(rel))
        behind = dist < CONTACT + 0.03 and float(rel @ -u) > math.cos(math.radians(25)) * dist
        if behind:
            # aim at a point just inside contact on the far side of the line: pushes along u and pulls the
            # gripper back onto the line when it drifts sideways
            aim = o - (CONTACT - min(speed, remaining)) * u
            return _towards(ee, aim, speed)
        staging = o - (CONTACT + 0.01) * u
        path = staging - ee
        t = float(np.clip((o - ee) @ path / max(float(path @ path), 1e-12), 0.0, 1.0))
        if np.linalg.norm(ee + t * path - o) >= CONTACT + 0.005:
            return _towards(ee, staging, speed)
        # the straight path would shove the object: walk around it on a circle until behind it
        radius = CONTACT + 0.03
        angle = math.atan2(rel[1], rel[0])
        goal_angle = math.atan2(-u[1], -u[0])
        diff = (goal_angle - angle + math.pi) % (2 * math.pi) - math.pi
        angle += math.copysign(min(abs(diff), 0.6), diff)
        waypoint = o + radius * np.array([math.cos(angle), math.sin(angle)])
        return _towards(ee, waypoint, speed)


class ExpertPolicy:
    """A scripted expert behind the policy interface (``get_action`` / ``metadata`` / ``reset``) for closed-loop
    evaluation of the evaluator itself. It cheats by reading ``env.unwrapped.world``; observations are ignored."""

    def __init__(self, env, noise: float = 0.0, seed: int | None = None):
        self.env = env
        self.expert = ScriptedExpert(noise=noise, seed=seed)

    def reset(self) -> None:
        pass

    def get_action(self, observation: dict) -> dict[str, np.ndarray]:
        return {"actions": self.expert.act(self.env.unwrapped.world)[None]}  # [H=1, A]

    def metadata(self) -> dict:
        env = self.env.unwrapped
        modality = MODALITIES[env.embodiment]
        return {
            "embodiments": {
                env.embodiment: {
                    "state_dim": modality.state_dim,
                    "action_dim": modality.action_dim,
                    "image_keys": list(env.views),
                    "image_size": [env.image_size, env.image_size],
                }
            },
            "horizon": 1,
        }


def make_expert(env, noise: float = 0.0, horizon: int = 1, seed: int = 0) -> ExpertPolicy:
    """The registry's expert factory (``envs.registry``): the scripted expert for ``env``, one step per chunk."""
    if horizon != 1:
        raise ValueError("the tabletop expert plans one step at a time: use --horizon 1")
    return ExpertPolicy(env, noise=noise, seed=seed)
