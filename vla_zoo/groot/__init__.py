"""Isaac-GR00T (N1 / N1.5) checkpoints in the zoo: read a released checkpoint folder into our classes, write back.

Command line: ``python -m vla_zoo.groot inspect|import|export`` (``vla_zoo/groot/cli.py``).
"""

from vla_zoo.groot.backbone import RELEASED_EAGLE, backbone_kwargs
from vla_zoo.groot.checkpoint import GrootCheckpointError, read_config, read_tensors, tensor_index
from vla_zoo.groot.cli import export_checkpoint, import_checkpoint, inspect_checkpoint
from vla_zoo.groot.head import (
    head_kwargs,
    head_state_from_reference,
    head_state_to_reference,
    load_groot_action_head,
    reference_config,
    save_groot_action_head,
)
from vla_zoo.groot.metadata import data_spec_from_metadata, metadata_from_data_spec, read_metadata
from vla_zoo.groot.tags import EMBODIMENT_TAG_SLOTS, embodiment_slot

__all__ = [
    "EMBODIMENT_TAG_SLOTS",
    "RELEASED_EAGLE",
    "backbone_kwargs",
    "data_spec_from_metadata",
    "metadata_from_data_spec",
    "read_metadata",
    "GrootCheckpointError",
    "embodiment_slot",
    "export_checkpoint",
    "import_checkpoint",
    "inspect_checkpoint",
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
