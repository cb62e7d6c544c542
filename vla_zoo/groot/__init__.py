"""Isaac-GR00T (N1 / N1.5) checkpoints in the zoo: read a released checkpoint folder into our classes, write back."""

from vla_zoo.groot.checkpoint import GrootCheckpointError, read_config, read_tensors, tensor_index
from vla_zoo.groot.head import (
    head_kwargs,
    head_state_from_reference,
    head_state_to_reference,
    load_groot_action_head,
    reference_config,
    save_groot_action_head,
)

__all__ = [
    "GrootCheckpointError",
    "head_kwargs",
    "head_state_from_reference",
    "head_state_to_reference",
    "load_groot_action_head",
    "read_config",
    "read_tensors",
    "reference_config",
    "save_groot_action_head",
    "tensor_index",
]
