"""Meta-World v3 (installed with the ``sim`` extra): a gymnasium env in the project's observation contract, the
scripted experts as policies, and the demonstration generator writing shards per tier."""

from envs.metaworld.tasks import EMBODIMENT, INSTRUCTIONS, MODALITY, MT10, instruction_for, resolve_tasks

__all__ = ["EMBODIMENT", "INSTRUCTIONS", "MODALITY", "MT10", "instruction_for", "resolve_tasks"]
