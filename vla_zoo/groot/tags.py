"""Isaac-GR00T embodiment tags -> the action head's embodiment slots (its "projector index")."""

from __future__ import annotations

from vla_zoo.groot.checkpoint import GrootCheckpointError

#: The released N1 / N1.5 tag table (``gr00t/data/embodiment_tags.py``); ``new_embodiment`` is the slot that
#: fine-tuning on a new robot trains.
EMBODIMENT_TAG_SLOTS = {
    "new_embodiment": 31,
    "gr1": 24,
    "agibot_genie1": 26,
    "genie1_gripper": 26,
    "oxe_droid": 17,
}


def embodiment_slot(tag: str, num_embodiments: int = 32) -> int:
    """The slot of a reference embodiment tag, or of ``TAG=SLOT`` for a tag the table does not know."""
    name, sep, slot = tag.partition("=")
    if sep:
        if not slot.isdigit() or not 0 <= int(slot) < num_embodiments:
            raise GrootCheckpointError(f"embodiment {tag!r}: the slot must be an integer in [0, {num_embodiments})")
        return int(slot)
    if name not in EMBODIMENT_TAG_SLOTS:
        raise GrootCheckpointError(
            f"unknown embodiment tag {name!r}: the released GR00T checkpoints know {sorted(EMBODIMENT_TAG_SLOTS)}; "
            "use one of them, or give the slot yourself as TAG=SLOT"
        )
    slot_id = EMBODIMENT_TAG_SLOTS[name]
    if slot_id >= num_embodiments:
        raise GrootCheckpointError(f"embodiment tag {name!r} is slot {slot_id}, but this head has {num_embodiments} slots")
    return slot_id
