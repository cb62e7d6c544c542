"""The data contract a trained policy keeps: what inference and the training loop need to know about the data.

``MixtureDataModule.data_spec()`` builds it; ``VLAPolicy`` stores it in every checkpoint (as ``to_dict()``: plain
data) and reads it back, and the deployable policy (``vla_zoo.policy.Policy``) normalises observations and
un-normalises actions with it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class EmbodimentSpec:
    """One embodiment of the training mixture."""

    id: int  # its slot in the action head's per-embodiment tables
    state_dim: int
    action_dim: int
    has_action: bool
    normalizer: dict[str, Any]  # ``datamodules.normalization.Normalizer.to_dict()``
    modality: dict[str, Any] | None = None  # state / action names and the like, from the source's sidecar


@dataclass(frozen=True)
class DataSpec:
    embodiments: dict[str, EmbodimentSpec]
    views: list[str]  # camera views, in the order of the batch's V axis
    image_size: list[int]  # [h, w]
    horizon: int  # H of the action chunks
    max_state_dim: int
    max_action_dim: int
    sources: list[str] = field(default_factory=list)  # source names by source_id
    # The target kinds each source declares (``SourceConfig.targets``), by source_id; None: real actions wherever
    # they exist, pseudo-labels everywhere.
    source_targets: list[list[str]] | None = None

    def embodiment(self, name: str) -> EmbodimentSpec:
        if name not in self.embodiments:
            raise KeyError(f"unknown embodiment {name!r}; this model knows {sorted(self.embodiments)}")
        return self.embodiments[name]

    def real_slots(self) -> dict[int, str]:
        """Slot -> name of the embodiments trained on real actions."""
        return {e.id: name for name, e in self.embodiments.items() if e.has_action}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataSpec:
        """The spec from ``to_dict()`` output (a checkpoint's ``vla_zoo_data_spec``)."""
        required = [f.name for f in fields(cls) if f.name not in ("sources", "source_targets")]
        missing = [k for k in required if k not in data]
        if missing:
            raise KeyError(f"data spec lacks {missing}: the checkpoint was not written by VLAPolicy with a "
                           "datamodule that provides data_spec() (e.g. datamodules.mixture.MixtureDataModule)")
        known = {f.name for f in fields(EmbodimentSpec)}
        embodiments = {name: EmbodimentSpec(**{k: v for k, v in e.items() if k in known})
                       for name, e in data["embodiments"].items()}
        return cls(**{**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}},
                      "embodiments": embodiments})
