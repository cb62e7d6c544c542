"""DataSpec: the typed data contract round-trips through the plain dict a checkpoint stores, and names its gaps."""

from __future__ import annotations

import pytest

from datamodules.spec import DataSpec, EmbodimentSpec


def spec() -> DataSpec:
    stats = {"min": [-1.0], "max": [1.0]}
    return DataSpec(
        embodiments={
            "gripper": EmbodimentSpec(id=0, state_dim=1, action_dim=1, has_action=True,
                                      normalizer={"mode": "min_max", "stats": {"state": stats, "actions": stats}},
                                      modality={"action_names": ["dx"]}),
            "human": EmbodimentSpec(id=2, state_dim=0, action_dim=0, has_action=False, normalizer={}),
        },
        views=["scene"], image_size=[64, 64], horizon=16, max_state_dim=8, max_action_dim=8,
        sources=["robot", "human"], source_targets=[["action", "latent"], ["latent"]],
    )


def test_round_trip_through_plain_data() -> None:
    plain = spec().to_dict()
    assert plain["embodiments"]["gripper"]["normalizer"]["mode"] == "min_max"  # nested dataclasses become dicts
    assert DataSpec.from_dict(plain) == spec()
    # An older checkpoint's spec without the per-source fields still loads.
    del plain["sources"], plain["source_targets"]
    old = DataSpec.from_dict(plain)
    assert old.sources == [] and old.source_targets is None


def test_lookups_and_missing_keys_name_what_is_known() -> None:
    assert spec().real_slots() == {0: "gripper"}
    assert spec().embodiment("gripper").action_dim == 1
    with pytest.raises(KeyError, match=r"unknown embodiment 'arm'; this model knows \['gripper', 'human'\]"):
        spec().embodiment("arm")
    plain = spec().to_dict()
    del plain["views"]
    with pytest.raises(KeyError, match=r"data spec lacks \['views'\]"):
        DataSpec.from_dict(plain)
