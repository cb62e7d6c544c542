"""Robot embodiments of the tabletop world: kinematics, state/action layouts and the expert's inverse map.

Both robots move one end-effector (EE) over the unit table ``[0, 1]^2`` (x right, y up) and open/close one gripper.
They differ in what they observe and command:

* ``point_gripper``: a Cartesian gantry. State ``(x, y, grip)``, action ``(dx, dy, grip)``: ``dx, dy`` in ``[-1, 1]``
  scaled by ``max_step`` table units per step.
* ``two_link_arm``: a planar arm whose base sits just below the table's bottom edge. State ``(q1, q2, grip)`` in
  radians, action ``(dq1, dq2, grip)``: joint deltas in ``[-1, 1]`` scaled by ``max_joint_step`` radians per step.
  The same joint command moves the EE by different amounts in different configurations (the Jacobian), so a policy
  has to learn the kinematics; it cannot copy the point gripper's actions.

``grip`` is a command in ``[0, 1]`` thresholded at 0.5 (1 = closed); in the state it is 0.0 or 1.0.
"""

from __future__ import annotations

import math

import numpy as np

from datamodules.episode import Modality

GRIP_THRESHOLD = 0.5

MODALITIES: dict[str, Modality] = {
    "point_gripper": Modality(
        state_names=["x", "y", "grip"],
        action_names=["dx", "dy", "grip"],
        state_groups={"position": (0, 2), "gripper": (2, 3)},
        action_groups={"position": (0, 2), "gripper": (2, 3)},
    ),
    "two_link_arm": Modality(
        state_names=["q1", "q2", "grip"],
        action_names=["dq1", "dq2", "grip"],
        state_groups={"joints": (0, 2), "gripper": (2, 3)},
        action_groups={"joints": (0, 2), "gripper": (2, 3)},
    ),
}


class PointGripper:
    """Cartesian EE; the action moves it by ``action[:2] * max_step`` (clipped to the table)."""

    name = "point_gripper"

    def __init__(self, max_step: float = 0.03):
        self.max_step = max_step
        self.ee_speed = max_step  # EE travel per step a controller should ask for
        self.ee = np.zeros(2)

    def state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(3, np.float32), np.ones(3, np.float32)

    def reset(self, ee: np.ndarray) -> None:
        self.ee = np.asarray(ee, dtype=np.float64).copy()

    def move(self, command: np.ndarray) -> None:
        self.ee = np.clip(self.ee + np.clip(command, -1.0, 1.0) * self.max_step, 0.0, 1.0)

    def joints(self) -> np.ndarray:
        return self.ee.copy()

    def links(self) -> list[np.ndarray]:
        """Points of the drawn kinematic chain, base first (none: a gantry is drawn as the EE alone)."""
        return []

    def command_for(self, displacement: np.ndarray) -> np.ndarray:
        """The ``[-1, 1]`` command that moves the EE by ``displacement`` (table units), saturating at max_step."""
        return np.clip(np.asarray(displacement) / self.max_step, -1.0, 1.0)


class TwoLinkArm:
    """Planar 2R arm: ``ee = base + l1 (cos q1, sin q1) + l2 (cos(q1 + q2), sin(q1 + q2))``.

    Joints stay within limits: ``q2`` in ``q2_limits`` keeps one elbow branch, away from the fully stretched
    singularity; ``q1`` in ``q1_limits`` keeps the arm pointing over the table.
    """

    name = "two_link_arm"

    def __init__(
        self,
        base: tuple[float, float] = (0.5, -0.05),
        link_lengths: tuple[float, float] = (0.55, 0.45),
        max_joint_step: float = 0.05,
        q1_limits: tuple[float, float] = (-0.5, math.pi + 0.5),
        q2_limits: tuple[float, float] = (0.15, 3.0),
        ee_speed: float = 0.03,
    ):
        self.base = np.asarray(base, dtype=np.float64)
        self.l1, self.l2 = link_lengths
        self.max_joint_step = max_joint_step
        self.ee_speed = ee_speed
        self.limits = np.array([q1_limits, q2_limits])  # [2, (low, high)]
        self.q = np.array([math.pi / 2, 1.0])
        self.ee = self.forward(self.q)

    def forward(self, q: np.ndarray) -> np.ndarray:
        q1, q2 = q
        return self.base + np.array(
            [self.l1 * math.cos(q1) + self.l2 * math.cos(q1 + q2), self.l1 * math.sin(q1) + self.l2 * math.sin(q1 + q2)]
        )

    def inverse(self, ee: np.ndarray) -> np.ndarray:
        """Joint angles (the ``q2 > 0`` branch) that put the EE at ``ee``; raises if it is out of reach."""
        dx, dy = np.asarray(ee, dtype=np.float64) - self.base
        c2 = (dx * dx + dy * dy - self.l1**2 - self.l2**2) / (2 * self.l1 * self.l2)
        if not -1.0 <= c2 <= 1.0:
            raise ValueError(f"two_link_arm cannot reach {tuple(ee)} from base {tuple(self.base)}")
        q2 = math.acos(c2)
        q1 = math.atan2(dy, dx) - math.atan2(self.l2 * math.sin(q2), self.l1 + self.l2 * math.cos(q2))
        return np.array([q1, q2])

    def jacobian(self, q: np.ndarray) -> np.ndarray:
        q1, q2 = q
        s1, c1, s12, c12 = math.sin(q1), math.cos(q1), math.sin(q1 + q2), math.cos(q1 + q2)
        return np.array(
            [[-self.l1 * s1 - self.l2 * s12, -self.l2 * s12], [self.l1 * c1 + self.l2 * c12, self.l2 * c12]]
        )

    def state_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        low, high = np.append(self.limits[:, 0], 0.0), np.append(self.limits[:, 1], 1.0)
        return low.astype(np.float32), high.astype(np.float32)

    def reset(self, ee: np.ndarray) -> None:
        self.q = np.clip(self.inverse(ee), self.limits[:, 0], self.limits[:, 1])
        self.ee = self.forward(self.q)

    def move(self, command: np.ndarray) -> None:
        q = self.q + np.clip(command, -1.0, 1.0) * self.max_joint_step
        self.q = np.clip(q, self.limits[:, 0], self.limits[:, 1])
        self.ee = self.forward(self.q)

    def joints(self) -> np.ndarray:
        return self.q.copy()

    def links(self) -> list[np.ndarray]:
        q1 = self.q[0]
        elbow = self.base + self.l1 * np.array([math.cos(q1), math.sin(q1)])
        return [self.base, elbow, self.ee]

    def command_for(self, displacement: np.ndarray) -> np.ndarray:
        """Joint command for an EE displacement: damped least squares through the Jacobian, then scaled (not
        clipped per joint) into ``[-1, 1]`` so that the EE still heads in the requested direction."""
        jac = self.jacobian(self.q)
        damping = 1e-4
        dq = jac.T @ np.linalg.solve(jac @ jac.T + damping * np.eye(2), np.asarray(displacement, dtype=np.float64))
        command = dq / self.max_joint_step
        peak = np.abs(command).max()
        return command / peak if peak > 1.0 else command


def make_embodiment(name: str) -> PointGripper | TwoLinkArm:
    if name == "point_gripper":
        return PointGripper()
    if name == "two_link_arm":
        return TwoLinkArm()
    raise ValueError(f"Unknown tabletop embodiment {name!r}; choose one of {sorted(MODALITIES)}")
