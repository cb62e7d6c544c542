"""System 2 backbones: freezing, masks, layout against the model's own processor, truncation, loading, learning."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoProcessor,
    Idefics3ForConditionalGeneration,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

from components.backbones import ComposedBackbone, SmolVLMBackbone
from components.backbones.common import pixel_shuffle
from components.backbones.vision import SpatialSoftmaxKeypoints
from components.backbones.tokenizer import SPECIAL_TOKENS, _trained_tokenizer_json, offline_tokenizer

ADAPTERS = [SmolVLMBackbone, ComposedBackbone]
INSTRUCTIONS = ["pick up the red block", "open the drawer", "push the small blue button to the left side of the table"]


def _images(batch: int, views: int = 2, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, views, 3, size, size), dtype=torch.uint8, generator=g)


def _build(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs)


# --- tokenizer -------------------------------------------------------------------------------------------------


def test_offline_tokenizer_round_trips_and_is_deterministic():
    tok = offline_tokenizer()
    for text in [*INSTRUCTIONS, "Stack the cubes, then wipe the plate!", "Grüße, robot 🤖: place it at (3, 4)"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # Instruction words are whole tokens, so prompts stay short.
    for word in ["pick", " block", " drawer", " green", "Open", " bowl"]:
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word
    for special in SPECIAL_TOKENS:
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]
    trained = _trained_tokenizer_json(2048)
    _trained_tokenizer_json.cache_clear()
    assert _trained_tokenizer_json(2048) == trained


# --- freezing --------------------------------------------------------------------------------------------------

FLAG_SETS = [
    dict(tune_llm=False, tune_visual=True, tune_projector=True),
    dict(tune_llm=True, tune_visual=False, tune_projector=False),
    dict(tune_llm=False, tune_visual=False, tune_projector=True),
    dict(tune_llm=True, tune_visual=True, tune_projector=True),
    dict(tune_llm=False, tune_visual=False, tune_projector=False),
]


@pytest.mark.parametrize("cls", ADAPTERS)
@pytest.mark.parametrize("flags", FLAG_SETS, ids=lambda f: "".join(k[5] if v else "-" for k, v in f.items()))
def test_frozen_flags_freeze_exactly_what_they_say(cls, flags):
    backbone = _build(cls, **flags)
    tuned = {"llm": flags["tune_llm"], "visual": flags["tune_visual"], "projector": flags["tune_projector"]}
    parts = backbone.tunable_parts()
    owner = {id(p): name for name, modules in parts.items() for m in modules for p in m.parameters()}
    assert len(owner) == len({id(p) for p in backbone.parameters()})  # every parameter in exactly one part
    for name, modules in parts.items():
        assert all(p.requires_grad == tuned[name] for m in modules for p in m.parameters()), name

    def modes() -> dict[str, set[bool]]:
        return {name: {s.training for m in modules for s in m.modules()} for name, modules in parts.items()}

    nn.ModuleList([backbone]).train()  # what Lightning does to the LightningModule holding it, every epoch
    assert modes() == {name: {tuned[name]} for name in parts}
    before = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    tokens, mask = backbone(_images(2), INSTRUCTIONS[:2])
    assert modes() == {name: {tuned[name]} for name in parts}  # forward does not touch modes
    if not any(tuned.values()):
        assert not tokens.requires_grad
        return
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    tokens[mask].square().mean().backward()
    optimizer.step()
    for n, p in backbone.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == tuned[owner[id(p)]], f"{n} ({owner[id(p)]}) changed={changed}"
    backbone.eval()
    assert modes() == {name: {False} for name in parts}
    backbone.train()
    assert modes() == {name: {tuned[name]} for name in parts}


# --- masks, instructions, images -------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ADAPTERS)
def test_mask_marks_padding_and_real_tokens_ignore_it(cls):
    backbone = _build(cls).eval()
    images = _images(3)
    with torch.no_grad():
        tokens, mask = backbone(images, INSTRUCTIONS)
        lengths = mask.sum(1)
        assert lengths.unique().numel() == 3 and mask.shape[1] == lengths.max()
        # Padding sits after the real tokens (right padding).
        assert torch.equal(mask, torch.arange(mask.shape[1])[None] < lengths[:, None])
        for i, instruction in enumerate(INSTRUCTIONS):
            alone, alone_mask = backbone(images[i : i + 1], [instruction])
            assert alone_mask.all() and alone.shape[1] == lengths[i]
            torch.testing.assert_close(tokens[i, : lengths[i]], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_instruction_and_each_view_change_the_tokens(cls):
    backbone = _build(cls).eval()
    images = _images(2)
    with torch.no_grad():
        base, mask = backbone(images, ["pick up the red block", "open the drawer"])
        assert torch.equal(base, backbone(images, ["pick up the red block", "open the drawer"])[0])
        other_text, _ = backbone(images, ["pick up the blue block", "open the drawer"])
        changed_view = images.clone()
        changed_view[0, 1] = 255 - changed_view[0, 1]
        other_view, _ = backbone(changed_view, ["pick up the red block", "open the drawer"])
    real = mask[0]
    for other in (other_text, other_view):
        assert (other[0] - base[0])[real].abs().amax() > 1e-2  # sample 0 changed ...
        torch.testing.assert_close(other[1], base[1])  # ... and only sample 0
    # Views are separate images in the prompt: the first view's slots come before the second's, so (causal LM)
    # changing the second view leaves every token up to the first view's block unchanged.
    first_block_end = backbone.tokens_per_image + 3
    torch.testing.assert_close(other_view[0, :first_block_end], base[0, :first_block_end])


@pytest.mark.parametrize("cls", ADAPTERS)
def test_frames_of_any_size_are_resized_to_the_model_resolution(cls):
    backbone = _build(cls).eval()
    colours = torch.tensor([[200, 30, 30], [20, 40, 220]], dtype=torch.uint8)
    constant = lambda h, w: colours[:, None, :, None, None].expand(2, 2, 3, h, w).contiguous()  # noqa: E731
    with torch.no_grad():
        native, _ = backbone(constant(64, 64), INSTRUCTIONS[:2])
        resized, _ = backbone(constant(48, 80), INSTRUCTIONS[:2])
    torch.testing.assert_close(resized, native, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cls", ADAPTERS)
def test_long_instructions_are_cut_to_max_text_tokens(cls):
    backbone = _build(cls, max_text_tokens=6).eval()
    head = "pick up the red block and"
    with torch.no_grad():
        a, mask_a = backbone(_images(1), [head + " then place it in the green bowl"])
        b, mask_b = backbone(_images(1), [head + " push the button twice"])
        short, mask_short = backbone(_images(1), ["pick up"])
    assert torch.equal(a, b) and mask_a.shape == mask_b.shape
    assert mask_a.shape[1] == mask_short.shape[1] + 6 - 2


def test_bad_inputs_raise_clear_errors(tmp_path):
    backbone = _build(ComposedBackbone)
    with pytest.raises(ValueError, match=r"uint8 \[B, V, 3, h, w\]"):
        backbone(_images(2).float(), INSTRUCTIONS[:2])
    with pytest.raises(ValueError, match="3 instructions for a batch of 2"):
        backbone(_images(2), INSTRUCTIONS)
    with pytest.raises(ValueError, match="select_layer=5 leaves 5 of the LM's 4 layers"):
        ComposedBackbone(select_layer=5)
    backbone.language_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="describes a 'llama' model; SmolVLMBackbone loads"):
        SmolVLMBackbone(str(tmp_path))


def test_pixel_shuffle_groups_neighbouring_patches():
    grid, scale = 4, 2
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    patches = torch.stack([rows, cols], -1).reshape(1, grid * grid, 2).float()  # each patch holds its (row, col)
    out = pixel_shuffle(patches, scale).view(grid // scale, grid // scale, scale * scale, 2)
    for i in range(grid // scale):
        for j in range(grid // scale):
            block = {(int(r), int(c)) for r, c in out[i, j]}
            assert block == {(scale * i + a, scale * j + b) for a in range(scale) for b in range(scale)}


# --- truncation, loading, the model's own processor ------------------------------------------------------------


@pytest.fixture(scope="module")
def smolvlm_checkpoint(tmp_path_factory):
    """A SmolVLM-shaped checkpoint directory (4-layer LM, LM head, final norm) saved the way the hub stores one."""
    torch.manual_seed(0)
    processor, config = SmolVLMBackbone._random_processor_and_config(64, 8, 2, 64, 2, 4, 128, 4, 4)
    model = Idefics3ForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("smolvlm")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path), model


def test_smolvlm_matches_the_reference_model_at_the_selected_layer(smolvlm_checkpoint):
    """Prompt layout, image preprocessing and truncation against transformers' own processor + full model."""
    path, reference = smolvlm_checkpoint
    images, instructions = _images(2), INSTRUCTIONS[:2]
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}] * 2 + [{"type": "text", "text": text}]}],
            add_generation_prompt=True,
        )
        for text in instructions
    ]
    frames = [[view.permute(1, 2, 0).numpy() for view in sample] for sample in images]
    inputs = processor(images=frames, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference.model(**inputs, output_hidden_states=True, use_cache=False).hidden_states

    full, middle, from_top = (SmolVLMBackbone(path, select_layer=k).eval() for k in (4, 2, -2))
    layer = sum(p.numel() for p in full.model.text_model.layers[0].parameters())
    assert len(middle.model.text_model.layers) == 2
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in middle.parameters()) == 2 * layer
    ids, is_image, mask = middle._tokenize(instructions, 2, "cpu")
    assert torch.equal(ids[mask], inputs["input_ids"][inputs["attention_mask"].bool()])
    assert torch.equal(mask, inputs["attention_mask"].bool())
    torch.testing.assert_close(middle._pixels(images.flatten(0, 1)), inputs["pixel_values"].flatten(0, 1))
    with torch.no_grad():
        features, mask = middle.features(images, instructions)
        torch.testing.assert_close(features[mask], hidden[2][mask], atol=1e-5, rtol=1e-5)
        assert torch.equal(features, from_top.features(images, instructions)[0])


def test_composed_truncation_equals_the_full_lm_hidden_state(tmp_path):
    full = _build(ComposedBackbone, select_layer=4).eval()
    full.language_model.save_pretrained(tmp_path)
    full.tokenizer.save_pretrained(tmp_path)
    middle = ComposedBackbone(lm_pretrained_path=str(tmp_path), select_layer=2).eval()
    middle.vision_model.load_state_dict(full.vision_model.state_dict())
    middle.connector.load_state_dict(full.connector.state_dict())
    assert len(middle.language_model.layers) == 2
    captured = []
    full.language_model.layers[1].register_forward_hook(lambda module, args, out: captured.append(out))
    with torch.no_grad():
        full.features(_images(2), INSTRUCTIONS[:2])
        features, mask = middle.features(_images(2), INSTRUCTIONS[:2])
    torch.testing.assert_close(features[mask], captured[0][mask], atol=1e-5, rtol=1e-5)


def test_smolvlm_round_trips_through_a_local_directory(tmp_path):
    saved = _build(SmolVLMBackbone, seed=3).eval()
    saved.model.save_pretrained(tmp_path)
    saved.processor.save_pretrained(tmp_path)
    loaded = SmolVLMBackbone(str(tmp_path), select_layer=2).eval()
    loaded.projector.load_state_dict(saved.projector.state_dict())  # ours, not part of a transformers checkpoint
    with torch.no_grad():
        expected, expected_mask = saved(_images(3), INSTRUCTIONS)
        tokens, mask = loaded(_images(3), INSTRUCTIONS)
    assert torch.equal(tokens, expected) and torch.equal(mask, expected_mask)


def test_composed_round_trips_through_local_directories(tmp_path):
    saved = _build(ComposedBackbone, seed=3).eval()
    # A full dual-encoder checkpoint, as SigLIP ships: the adapter takes its vision half.
    siglip = SiglipModel(
        SiglipConfig(
            vision_config=saved.vision_model.config.to_dict(),
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        )
    )
    siglip.vision_model.load_state_dict(saved.vision_model.state_dict())
    siglip.save_pretrained(tmp_path / "vision")
    SiglipImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "vision")
    saved.language_model.save_pretrained(tmp_path / "lm")
    saved.tokenizer.save_pretrained(tmp_path / "lm")
    loaded = ComposedBackbone(str(tmp_path / "vision"), str(tmp_path / "lm"), select_layer=2).eval()
    loaded.connector.load_state_dict(saved.connector.state_dict())
    loaded.projector.load_state_dict(saved.projector.state_dict())
    with torch.no_grad():
        expected, expected_mask = saved(_images(3), INSTRUCTIONS)
        tokens, mask = loaded(_images(3), INSTRUCTIONS)
    assert torch.equal(tokens, expected) and torch.equal(mask, expected_mask)


@pytest.mark.parametrize("vision_model_type", ["siglip2_vision_model", "clip_vision_model", "resnet"])
def test_composed_accepts_other_vision_encoders(vision_model_type):
    backbone = _build(ComposedBackbone, vision_model_type=vision_model_type).eval()
    images = _images(2)
    with torch.no_grad():
        tokens, mask = backbone(images, INSTRUCTIONS[:2])
        flipped, _ = backbone(images.flip(-1), INSTRUCTIONS[:2])
    assert tokens.shape[-1] == backbone.out_dim
    assert (flipped - tokens)[mask].abs().amax() > 1e-2  # patch tokens, not a constant, reach the LM


def test_keypoint_token_follows_an_object_and_needs_a_feature_map():
    backbone = _build(ComposedBackbone, vision_model_type="resnet", keypoints=8).eval()
    plain = _build(ComposedBackbone, vision_model_type="resnet")
    assert backbone.tokens_per_image == plain.tokens_per_image + 1
    images = torch.zeros(2, 1, 3, 64, 64, dtype=torch.uint8)
    images[0, 0, :, 8:16, 8:16] = 255
    images[1, 0, :, 44:52, 40:48] = 255
    with torch.no_grad():
        kp = backbone.keypoint_reader.keypoints(
            backbone.vision_model(pixel_values=backbone._pixels(images.flatten(0, 1))).last_hidden_state)
    assert (kp[0] - kp[1]).abs().amax() > 1e-2  # the keypoints depend on where the square is
    with pytest.raises(ValueError, match="keypoints=8: spatial-softmax keypoints need a conv vision encoder"):
        ComposedBackbone(keypoints=8)  # the default ViT has patch tokens, no feature map


def test_coord_channels_break_the_conv_towers_translation_equivariance():
    """CoordConv's point: a feature can say *where* it is. On a uniform image, the plain tower's cells far from the
    zero-padded border are all equal (it is translation-equivariant there); with the (x, y) channels they differ."""
    image = torch.full((1, 3, 256, 256), 128, dtype=torch.uint8)  # a 32 x 32 feature map: plenty of interior cells
    spread = {}
    for coords in (False, True):
        backbone = _build(ComposedBackbone, vision_model_type="resnet", image_size=256, coord_channels=coords).eval()
        with torch.no_grad():
            fmap = backbone.vision_model(pixel_values=backbone.vision.with_coords(backbone._pixels(image))).last_hidden_state
        interior = fmap[0, :, 12:20, 12:20].flatten(1)  # [C, 64 cells]
        spread[coords] = (interior - interior[:, :1]).abs().amax().item()
    assert spread[False] < 1e-5 and spread[True] > 1e-2, spread
    with pytest.raises(ValueError, match="coord_channels=True needs the random conv tower"):
        ComposedBackbone(coord_channels=True)  # a ViT takes 3-channel images


def test_spatial_softmax_keypoint_lands_on_a_peak_between_cells():
    """A Gaussian bump centred between cells: the expected position is the bump's centre, not the nearest cell."""
    reader = SpatialSoftmaxKeypoints(channels=1, num_keypoints=1, out_dim=4)
    with torch.no_grad():
        reader.to_logits.weight.fill_(1.0)
        reader.to_logits.bias.zero_()
    axis = torch.linspace(-1, 1, 8)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    for cx, cy in [(0.13, -0.41), (-0.66, 0.52)]:
        bump = -((xx - cx).square() + (yy - cy).square()) / (2 * 0.15**2)  # log of a Gaussian: softmax = the bump
        kp = reader.keypoints(bump[None, None])[0, 0]
        assert torch.allclose(kp, torch.tensor([cx, cy]), atol=0.02), kp  # cells are 0.29 apart


def test_spatial_softmax_keypoints_learn_to_locate_a_square(seed=0):
    """From random weights, the reader alone (1x1 conv + temperature + MLP) on raw 16x16 maps learns the square's
    position: held-out R^2 > 0.85 after 600 steps (seeds 0-2 give 0.93, 0.99, 0.99; chance is 0)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def batch(n):
        maps = torch.rand(n, 3, 16, 16, generator=g) * 0.5
        pos = torch.randint(0, 14, (n, 2), generator=g)
        for i, (r, c) in enumerate(pos.tolist()):
            maps[i, 0, r : r + 3, c : c + 3] = 2.0  # a red-ish square on noise
        return maps, (pos.float() + 1) / 15 * 2 - 1  # centre, in [-1, 1] as (row, col)

    reader = SpatialSoftmaxKeypoints(channels=3, num_keypoints=4, out_dim=2)
    optimizer = torch.optim.Adam(reader.parameters(), lr=1e-2)
    for _ in range(600):
        maps, target = batch(32)
        loss = F.mse_loss(reader(maps)[:, 0], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    maps, target = batch(256)
    with torch.no_grad():
        pred = reader(maps)[:, 0]
    r2 = 1 - (pred - target).square().sum() / (target - target.mean(0)).square().sum()
    assert r2 > 0.85, r2


# --- learning --------------------------------------------------------------------------------------------------

COLOURS = torch.tensor([[220, 40, 40], [40, 60, 220]], dtype=torch.uint8)


def _colour_task(batch: int, g: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """A red or a blue square somewhere on a noise image; instructions are distractors."""
    labels = torch.randint(0, 2, (batch,), generator=g)
    images = torch.randint(0, 256, (batch, 1, 3, 64, 64), dtype=torch.uint8, generator=g)
    for i, label in enumerate(labels.tolist()):
        r, c = torch.randint(0, 48, (2,), generator=g).tolist()
        images[i, 0, :, r : r + 16, c : c + 16] = COLOURS[label][:, None, None]
    instructions = [INSTRUCTIONS[j] for j in torch.randint(0, 3, (batch,), generator=g).tolist()]
    return images, instructions, labels


def _verb_task(batch: int, g: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Which verb the instruction uses; its colour and object words and the noise images are distractors."""
    labels = torch.randint(0, 2, (batch,), generator=g)
    colours = torch.randint(0, 4, (batch,), generator=g).tolist()
    things = torch.randint(0, 5, (batch,), generator=g).tolist()
    colour_words, thing_words = ["red", "green", "blue", "yellow"], ["block", "cup", "bowl", "button", "drawer"]
    instructions = [
        f"{['pick up', 'push'][y]} the {colour_words[c]} {thing_words[t]}"
        for y, c, t in zip(labels.tolist(), colours, things)
    ]
    images = torch.randint(0, 256, (batch, 1, 3, 64, 64), dtype=torch.uint8, generator=g)
    return images, instructions, labels


@pytest.mark.parametrize("task, lr", [(_colour_task, 1e-3), (_verb_task, 3e-3)], ids=["colour", "verb"])
@pytest.mark.parametrize("cls", ADAPTERS)
def test_tuned_parts_and_a_probe_learn_a_label_from_pooled_tokens(cls, task, lr, seed=0):
    """Default flags (vision tower + projector tuned, LM frozen), 20 AdamW steps of 16 samples, held-out loss.

    Calibrated over seeds 0-2 for both adapters: worst held-out loss 0.018 (colour) and 0.031 (verb); chance is 0.69.
    """
    backbone = _build(cls, seed=seed).train()
    probe = nn.Linear(backbone.out_dim, 2)
    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad] + list(probe.parameters()), lr)
    g = torch.Generator().manual_seed(seed)

    def logits(images, instructions):
        tokens, mask = backbone(images, instructions)
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        # Standardised over the batch (an MAE-style linear probe): the shared offset of the pooled tokens would
        # otherwise dominate and make plain logistic regression crawl.
        return probe((pooled - pooled.mean(0)) / (pooled.std(0) + 1e-5))

    for _ in range(20):
        images, instructions, labels = task(16, g)
        loss = F.cross_entropy(logits(images, instructions), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    backbone.eval()
    images, instructions, labels = task(64, g)
    with torch.no_grad():
        out = logits(images, instructions)
    assert F.cross_entropy(out, labels).item() < 0.2
    assert (out.argmax(1) == labels).float().mean().item() > 0.9


def test_conv_tower_runs_channels_last_and_computes_what_nchw_computes():
    """The conv tower is kept channels-last for speed (benchmarks/train_step_speed.py); that must change neither the
    features nor survive only until the next state-dict load."""
    import copy

    backbone = _build(ComposedBackbone, vision_model_type="resnet")
    convs = [p for p in backbone.vision_model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    nchw = copy.deepcopy(backbone.vision_model).to(memory_format=torch.contiguous_format)
    assert not all(p.is_contiguous(memory_format=torch.channels_last) for p in nchw.parameters() if p.dim() == 4)
    pixels = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ours = backbone.vision_model(pixel_values=pixels.contiguous(memory_format=torch.channels_last))
        theirs = nchw(pixel_values=pixels)
    torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-4, rtol=1e-4)

    reloaded = _build(ComposedBackbone, seed=1, vision_model_type="resnet")
    reloaded.load_state_dict(backbone.state_dict())
    assert all(p.is_contiguous(memory_format=torch.channels_last)
               for p in reloaded.vision_model.parameters() if p.dim() == 4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_images(2), INSTRUCTIONS[:2])[0], backbone(_images(2), INSTRUCTIONS[:2])[0])


def test_conv_tower_stage_widths_narrow_the_costly_first_stage_only():
    """`vision_hidden_size: [32, 64]` narrows the 16x16 stage, where most of the tower's compute is, and keeps 64
    features per token for the LM; a list where it cannot apply is refused with the fix."""
    from torch.utils.flop_counter import FlopCounterMode

    def tower_flops(widths):  # -> (backbone, FLOPs of its vision tower per op)
        backbone = _build(ComposedBackbone, vision_model_type="resnet", vision_hidden_size=widths)
        with FlopCounterMode(display=False) as counter:
            backbone(_images(2), INSTRUCTIONS[:2])
        return backbone, counter.get_flop_counts()["ComposedBackbone.vision_model"]

    mixed, mixed_flops = tower_flops([32, 64])
    _, wide_flops = tower_flops(64)
    _, narrow_flops = tower_flops(32)
    assert sum(mixed_flops.values()) < 0.6 * sum(wide_flops.values())  # most of the saving of the all-32 tower
    assert sum(narrow_flops.values()) < sum(mixed_flops.values())
    with torch.no_grad():
        features = mixed.vision_model(pixel_values=torch.randn(1, 3, 64, 64)).last_hidden_state
    assert features.shape[1] == 64  # the LM still receives the wide stage's features
    with pytest.raises(ValueError, match=r"one entry per stage \(vision_layers=2\)"):
        ComposedBackbone(vision_model_type="resnet", vision_hidden_size=[32, 64, 64])
    with pytest.raises(ValueError, match="needs the random conv tower"):
        ComposedBackbone(vision_hidden_size=[32, 64])


def test_composed_gr00t_options_keep_the_final_norm_and_pass_the_lm_width_on():
    """``keep_final_norm`` gives the LM's normed output at ``select_layer``; the 1-layer connector and the
    identity / linear projectors have the module layout of Isaac-GR00T's ``mlp1`` and ``eagle_linear``."""
    torch.manual_seed(0)
    kept = ComposedBackbone(keep_final_norm=True, connector="linear", scale_factor=1, projector="identity",
                            project_to=128).eval()
    stripped = ComposedBackbone(scale_factor=1, connector="linear").eval()
    stripped.load_state_dict({k: v for k, v in kept.state_dict().items() if not k.startswith("language_model.norm")},
                             strict=False)
    assert isinstance(kept.projector, nn.Identity) and sorted(kept.connector.state_dict()) == ["mlp.0.bias", "mlp.0.weight"]
    assert kept.tokens_per_image == (64 // 8) ** 2  # no pixel shuffle: one token per patch
    with torch.no_grad():
        normed, mask = kept.features(_images(2), INSTRUCTIONS[:2])
        raw, _ = stripped.features(_images(2), INSTRUCTIONS[:2])
        torch.testing.assert_close(normed, kept.language_model.norm(raw), rtol=1e-5, atol=1e-5)
        assert torch.equal(kept(_images(2), INSTRUCTIONS[:2])[0], normed)
    assert isinstance(ComposedBackbone(projector="linear", project_to=16).projector, nn.Linear)
    with pytest.raises(ValueError, match="projector='identity' passes the LM's width \\(128\\) on, but project_to=16"):
        ComposedBackbone(projector="identity", project_to=16)
    with pytest.raises(ValueError, match="connector='conv'"):
        ComposedBackbone(connector="conv")


# --- Hub ids and local directories -----------------------------------------------------------------------------


def test_a_path_is_a_local_directory_or_a_hub_id(tmp_path, monkeypatch):
    from components.backbones.common import hub_kwargs

    assert hub_kwargs(str(tmp_path), "pretrained_path") == {"local_files_only": True}  # disk only, online or not
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert hub_kwargs("HuggingFaceTB/SmolVLM-256M-Instruct", "pretrained_path") == {}  # online: may download
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_kwargs("HuggingFaceTB/SmolVLM-256M-Instruct", "pretrained_path") == {"local_files_only": True}
    for missing in (str(tmp_path / "no" / "such"), "./models/smolvlm", "~/models/smolvlm"):
        with pytest.raises(FileNotFoundError, match=r"lm_pretrained_path: .* is not a directory; .*save_pretrained"):
            ComposedBackbone(lm_pretrained_path=missing)


def test_a_hub_id_loads_from_the_cache_when_offline(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE: an id is read from the Hugging Face cache (here a hand-made one), and an id the cache lacks
    is reported under its recipe key."""
    from huggingface_hub import constants

    saved = _build(SmolVLMBackbone, seed=3).eval()
    snapshot = tmp_path / "models--vla-zoo--tiny-smolvlm" / "snapshots" / ("0" * 40)
    saved.model.save_pretrained(snapshot)
    saved.processor.save_pretrained(snapshot)
    (tmp_path / "models--vla-zoo--tiny-smolvlm" / "refs").mkdir()
    (tmp_path / "models--vla-zoo--tiny-smolvlm" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = SmolVLMBackbone("vla-zoo/tiny-smolvlm", select_layer=2).eval()
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.vision_model.parameters(),
                                                  saved.model.vision_model.parameters()))
    with pytest.raises(FileNotFoundError, match=r"pretrained_path: 'vla-zoo/absent' .*HF_HUB_OFFLINE"):
        SmolVLMBackbone("vla-zoo/absent")
