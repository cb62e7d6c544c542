"""The deployable Policy's input checks: non-finite state is refused naming the key; a state outside the training
range is clipped to it, as in training, with one warning per embodiment per policy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from components.action_head import FlowMatchingActionHead
from components.backbones import SmolVLMBackbone
from datamodules.normalization import Normalizer
from datamodules.spec import DataSpec
from lit_modules.vla_policy import VLAPolicy
from tests.vla_zoo.policy_fixtures import make_observation
from vla_zoo.deploy.validation import ObservationError
from vla_zoo.policy import Policy

STATE_LOW, STATE_HIGH = [-1.0, -2.0, 0.0], [1.0, 2.0, 1.0]


@pytest.fixture(scope="module")
def module() -> VLAPolicy:
    torch.manual_seed(0)
    backbone = SmolVLMBackbone(select_layer=1, project_to=32, image_size=32, patch_size=8, vision_hidden_size=32,
                               vision_layers=1, vision_heads=2, lm_hidden_size=32, lm_layers=1, lm_heads=2)
    head = FlowMatchingActionHead(num_embodiments=1, max_state_dim=4, max_action_dim=4, horizon=4, hidden_dim=32,
                                  num_layers=1, num_heads=2, cross_attention_dim=32, embodiment_hidden_dim=32)
    model = VLAPolicy(backbone=backbone, action_head=head)
    stats = {"min": STATE_LOW, "max": STATE_HIGH}
    normalizer = Normalizer({"state": stats, "actions": {"min": [-1.0] * 3, "max": [1.0] * 3}})
    model.data_spec = DataSpec.from_dict({
        "embodiments": {"point_gripper": {"id": 0, "state_dim": 3, "action_dim": 3, "has_action": True,
                                          "normalizer": normalizer.to_dict(), "modality": None}},
        "views": ["scene", "wrist"], "image_size": [32, 32], "horizon": 4, "max_state_dim": 4, "max_action_dim": 4,
    })
    return model


def _observation(state: list[float]) -> dict:
    obs = make_observation(np.random.default_rng(0), image_size=32)
    return {**obs, "state": np.array(state, np.float32)}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused_naming_the_key(module, bad) -> None:
    policy = Policy(module, num_steps=2)
    with pytest.raises(ObservationError, match=r"observation\['state'\] holds NaN or inf at dims \[1\]"):
        policy.get_action(_observation([0.0, bad, 0.5]))


def test_out_of_range_state_is_clipped_with_one_warning_per_policy(module) -> None:
    far = _observation([0.5, 1e6, 0.5])
    clipped = {**far, "state": np.array([0.5, STATE_HIGH[1], 0.5], np.float32)}
    policy = Policy(module, num_steps=2, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = policy.get_action(far)["actions"]
        policy.get_action(far)
        policy.get_action(clipped)
    messages = [str(w.message) for w in caught if "outside the range" in str(w.message)]
    assert len(messages) == 1, messages
    assert "observation['state']" in messages[0] and "dims [1]" in messages[0] and "point_gripper" in messages[0]
    # Clipping is the documented behaviour: the same actions as for the state at the edge of the range.
    expected = Policy(module, num_steps=2, seed=3).get_action(clipped)["actions"]
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got).all()
    with pytest.warns(UserWarning, match="outside the range"):  # a new policy warns again
        Policy(module, num_steps=2).get_action(far)


def test_in_range_state_gives_no_warning(module) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Policy(module, num_steps=2).get_action(_observation([STATE_LOW[0], STATE_HIGH[1], 0.5]))
    assert not [w for w in caught if "outside the range" in str(w.message)]
