"""The batch schema shared by every datamodule and every model in the zoo.

A datamodule yields dicts with these keys (per sample shapes below; a batch adds a leading ``B``). Every source,
with or without actions, yields the same keys so that the default collate works on mixed batches: actionless
samples carry zeros and ``has_action = False`` / all-False masks.

=================  ==========================  =======================================================================
key                per-sample shape / type     meaning
=================  ==========================  =======================================================================
``images``         uint8 ``[T, V, 3, h, w]``   frames at t and t+H (T = 2) for each of V views, RGB
``state``          float32 ``[S_max]``         proprioception, normalised per embodiment, zero-padded
``state_mask``     bool ``[S_max]``            True on the embodiment's real state dims
``actions``        float32 ``[H, A_max]``      action chunk a_t .. a_{t+H-1}, normalised per embodiment, zero-padded
``action_mask``    bool ``[H, A_max]``         True on real action dims AND real (not past-episode-end) steps
``has_action``     bool ``[]``                 False for actionless video (human / neural tiers)
``embodiment_id``  int64 ``[]``                slot of the embodiment in the action head's per-embodiment tables
``source_id``      int64 ``[]``                index of the source in the mixture (per-source logging)
``instruction``    ``str``                     natural-language task instruction
``episode``        int64 ``[]``                episode index within its source
``step``           int64 ``[]``                anchor step t within the episode
=================  ==========================  =======================================================================

Optional keys, present only when a source of the mixture has privileged (simulator-only) state:

=====================  ======================  =====================================================================
``privileged``         float32 ``[P_max]``     e.g. object and goal positions at t, standardised per source, zero-padded:
                                               an auxiliary training target (``components.privileged_head``), never
                                               a policy input
``privileged_mask``    bool ``[P_max]``        True on the dims the sample's source has
=====================  ======================  =====================================================================
"""

IMAGES = "images"
STATE = "state"
STATE_MASK = "state_mask"
ACTIONS = "actions"
ACTION_MASK = "action_mask"
HAS_ACTION = "has_action"
EMBODIMENT_ID = "embodiment_id"
SOURCE_ID = "source_id"
INSTRUCTION = "instruction"
EPISODE = "episode"
STEP = "step"

TENSOR_KEYS = (IMAGES, STATE, STATE_MASK, ACTIONS, ACTION_MASK, HAS_ACTION, EMBODIMENT_ID, SOURCE_ID, EPISODE, STEP)
ALL_KEYS = TENSOR_KEYS + (INSTRUCTION,)

PRIVILEGED = "privileged"
PRIVILEGED_MASK = "privileged_mask"
OPTIONAL_TENSOR_KEYS = (PRIVILEGED, PRIVILEGED_MASK)


def batch_size(batch: dict) -> int:
    """Samples in a collated batch (for ``lightning.pytorch.callbacks.ThroughputMonitor(batch_size_fn=...)``)."""
    return len(batch[ACTIONS])
