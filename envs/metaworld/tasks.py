"""Meta-World v3 task names, one instruction template per task, and the Sawyer modality.

Meta-World ships no language: every task gets one imperative instruction written here. The Sawyer is driven in
end-effector space (``dx, dy, dz`` move the mocap target by up to 1 cm per step; ``grip`` in [-1, 1] closes the
fingers), and its proprioception is the first four numbers of Meta-World's 39-D observation: hand xyz and the
finger opening.
"""

from __future__ import annotations

from datamodules.episode import Modality

EMBODIMENT = "sawyer"

MODALITY = Modality(
    state_names=["x", "y", "z", "gripper"],
    action_names=["dx", "dy", "dz", "grip"],
    state_groups={"end_effector_position": (0, 3), "gripper": (3, 4)},
    action_groups={"end_effector_delta": (0, 3), "gripper": (3, 4)},
)

#: The MT10 benchmark, in Meta-World's own order.
MT10 = [
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
]

INSTRUCTIONS = {
    "assembly-v3": "put the ring on the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the block from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button behind the wall from the top",
    "button-press-v3": "press the button",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out of the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "pick the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put your hand into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate into the cabinet from the side",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate out of the cabinet to the side",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the bottle with the stick",
    "stick-pull-v3": "pull the bottle with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "place the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}


def instruction_for(task: str) -> str:
    """The instruction template of a Meta-World task (e.g. ``"push-v3"``)."""
    if task not in INSTRUCTIONS:
        raise KeyError(f"unknown Meta-World task {task!r}; known v3 tasks: {sorted(INSTRUCTIONS)}")
    return INSTRUCTIONS[task]


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from a list or a comma-separated string; ``"MT10"`` expands to the MT10 benchmark."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            continue
        if name.upper() == "MT10":
            out.extend(MT10)
        else:
            instruction_for(name)  # validates the name
            out.append(name)
    if not out:
        raise ValueError("no Meta-World tasks given")
    return out
