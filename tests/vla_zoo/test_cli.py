"""The `lightning` / `vla-zoo` / `python -m vla_zoo` command: runs, saves configs, layers, fails clearly."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT, run_cli
from lit_modules.checkpoint import CONFIG_KEY, load_run_config, read_checkpoint
from vla_zoo.cli import main

MINIMAL = str(REPO_ROOT / "recipes" / "minimal.yaml")


def _fit_args(tmp_path: Path) -> list[str]:
    return [
        "fit", "--config", MINIMAL, "--trainer.max_steps=5", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]


@pytest.mark.parametrize("entry", ["lightning", "vla-zoo", "module"])
def test_fit_writes_checkpoint_and_config(entry: str, tmp_path: Path) -> None:
    proc = run_cli(_fit_args(tmp_path), entry=entry)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # What the user sees: the bar with the run's last epoch, Lightning's lines once, no cloud advert, no warnings.
    assert "Epoch 0/0" in proc.stdout and proc.stderr.count("Seed set to 0") == 1, proc.stderr[-3000:]
    assert "Tip:" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr[-3000:]
    run_dir = tmp_path / "logs" / "version_0"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 5
    ckpt = tmp_path / "checkpoints" / "last.ckpt"  # <default_root_dir>/checkpoints: the same for every run
    assert ckpt.is_file()
    # TensorBoard events and the CSV metrics of one run share its version folder.
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "metrics.csv").is_file()
    # The checkpoint carries the recipe on its own and rebuilds its model without the log dir.
    embedded = load_run_config(ckpt)
    assert embedded["model"]["class_path"] == "lit_modules.chunk_regressor.StateChunkRegressor"
    assert embedded["trainer"]["max_steps"] == 5
    from lit_modules.chunk_regressor import StateChunkRegressor

    model = StateChunkRegressor.load_from_checkpoint(ckpt)
    state = read_checkpoint(ckpt)["state_dict"]
    assert torch.equal(model.state_dict()["net.0.weight"], state["net.0.weight"])


def test_training_reduces_loss(tmp_path: Path) -> None:
    """The smoke recipe actually learns: validation loss after 50 steps is well below the first one."""
    args = _fit_args(tmp_path)
    args[args.index("--trainer.max_steps=5")] = "--trainer.max_steps=50"
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert train[-1] < 0.5 * train[0], train


def test_validate_reruns_a_finished_run_from_its_own_config(tmp_path: Path) -> None:
    args = [*_fit_args(tmp_path), "--trainer.logger=false"]  # config.yaml then lands in default_root_dir
    assert run_cli(args).returncode == 0
    config = tmp_path / "config.yaml"
    written = config.read_text()
    ckpt = next(tmp_path.rglob("last.ckpt"))
    proc = run_cli(["validate", "--config", str(config), f"--ckpt_path={ckpt}", "--trainer.logger=false"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "val/loss" in proc.stdout
    assert config.read_text() == written


def _print_config(*configs: str, extra: tuple[str, ...] = ()) -> dict:
    args = ["fit"]
    for c in configs:
        args += ["--config", c]
    proc = run_cli([*args, *extra, "--print_config"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def test_print_config_resolves_defaults() -> None:
    config = _print_config(MINIMAL)
    # Defaults the recipe does not spell out are resolved and printed.
    assert config["model"]["init_args"]["net"]["init_args"]["activation"] == "gelu"
    assert config["data"]["init_args"]["seed"] == 0


def test_layered_config_changes_only_what_the_overlay_sets(tmp_path: Path) -> None:
    overlay = tmp_path / "ablation.yaml"
    overlay.write_text(
        "model:\n  init_args:\n    lr: 0.0001\n    net:\n      init_args:\n        hidden_dims: [32]\n"
        "trainer:\n  max_steps: 7\n"
    )
    base = _flatten(_print_config(MINIMAL))
    layered = _flatten(_print_config(MINIMAL, str(overlay)))
    changed = {k for k in base.keys() | layered.keys() if base.get(k) != layered.get(k)}
    assert changed == {"model.init_args.lr", "model.init_args.net.init_args.hidden_dims", "trainer.max_steps"}
    assert layered["model.init_args.lr"] == 0.0001 and layered["trainer.max_steps"] == 7
    # Left to right: a later overlay overrides an earlier one and keeps what it does not set.
    later = tmp_path / "later.yaml"
    later.write_text("model:\n  init_args:\n    lr: 0.5\n")
    both = _flatten(_print_config(MINIMAL, str(overlay), str(later)))
    assert both["model.init_args.lr"] == 0.5
    assert both["model.init_args.net.init_args.hidden_dims"] == [32]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--model.class_path=lit_modules.nope.Nope"], ["lit_modules.nope.Nope", "model"]),
        (["--model.init_args.lrr=0.1"], ["lrr"]),
        (["--trainer.max_stepz=3"], ["--trainer.max_stepz"]),
        (["--config", "does/not/exist.yaml"], ["does/not/exist.yaml", "config"]),
    ],
    ids=["unknown-class-path", "misspelt-model-arg", "misspelt-trainer-arg", "missing-file"],
)
def test_common_mistakes_exit_nonzero_naming_key(extra: list[str], expected: list[str], tmp_path: Path) -> None:
    proc = run_cli([*_fit_args(tmp_path), *extra])
    assert proc.returncode != 0
    for needle in expected:
        assert needle in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "logs").exists(), "a bad config must fail before any run directory is written"


def test_missing_required_argument_names_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    config = yaml.safe_load(Path(MINIMAL).read_text())
    del config["model"]["init_args"]["net"]["init_args"]["in_dim"]
    bad.write_text(yaml.safe_dump(config))
    proc = run_cli(["fit", "--config", str(bad), f"--trainer.default_root_dir={tmp_path}"])
    assert proc.returncode != 0
    assert "in_dim" in proc.stderr, proc.stderr[-2000:]


def test_nested_class_path_typo_names_the_class(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(MINIMAL).read_text().replace("components.mlp.MLP", "components.mlp.MPL"))
    proc = run_cli(["fit", "--config", str(bad)])
    assert proc.returncode != 0
    assert "components.mlp.MPL" in proc.stderr and '"net"' in proc.stderr, proc.stderr[-2000:]


def test_checkpoint_without_embedded_config_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(KeyError, match=CONFIG_KEY):
        load_run_config(path)


PRETRAIN = str(REPO_ROOT / "recipes" / "pretrain.yaml")
ABLATIONS = sorted((REPO_ROOT / "recipes" / "ablations").glob("*.yaml")) + sorted(
    (REPO_ROOT / "recipes" / "explore" / "lam").glob("*.yaml"))


def _print_config_in_process(capsys: pytest.CaptureFixture, *configs: str) -> dict:
    """``_print_config`` without the subprocess: the CLI's own ``main`` in this process. The tests that check the
    command itself keep the subprocess; the per-ablation test below spent ~10 s per recipe re-importing torch in one."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[arg for c in configs for arg in ("--config", c)], "--print_config"])
    out = capsys.readouterr()
    assert exit_info.value.code in (0, None), out.err[-3000:]
    return yaml.safe_load(out.out)


@pytest.mark.parametrize("overlay", ABLATIONS, ids=lambda p: p.stem)
def test_each_ablation_layers_on_the_pretraining_recipe(overlay: Path, capsys: pytest.CaptureFixture) -> None:
    """Every value an ablation sets survives layering and validation (a renamed argument fails here, not in a run)."""
    # Overlays of the conv tower layer on the composed backbone (and keypoints and CoordConv on the conv tower).
    needs = {"conv_vision": ["composed_backbone"], "keypoints": ["composed_backbone", "conv_vision"],
             "coord_conv": ["composed_backbone", "conv_vision"]}
    base = [str(REPO_ROOT / "recipes" / "ablations" / f"{name}.yaml") for name in needs.get(overlay.stem, [])]
    # Ablations of the latent-action model layer on its own recipe.
    recipe = str(REPO_ROOT / "recipes" / "lam.yaml") if overlay.stem.startswith("lam_") else PRETRAIN
    config = _flatten(_print_config_in_process(capsys, recipe, *base, str(overlay)))
    for key, value in _flatten(yaml.safe_load(overlay.read_text())).items():
        assert _contains(config[key], value), key


def _contains(actual, expected) -> bool:
    """``expected`` (as written in a recipe) is in ``actual`` (as validated, with every default filled in)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(k in actual and _contains(actual[k], v) for k, v in expected.items())
    if isinstance(expected, str) and "${" in expected:  # a reference: tests/recipes/test_recipe_references.py
        return True
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(_contains(a, e) for a, e in zip(actual, expected)))
    return actual == expected


def test_idm_recipe_validates_on_held_out_worlds_at_one_horizon() -> None:
    """recipes/idm.yaml: `val/action_r2` must come from the pyramid's held-out split, never from training shards,
    and the pyramid, the data and the IDM head must share one horizon (else frame t+H is not what the head assumes)."""
    config = _print_config(str(REPO_ROOT / "recipes" / "idm.yaml"))
    data = config["data"]["init_args"]
    prepare = data["prepare"]["init_args"]
    root = prepare["root"]
    assert [s["shards"] for s in data["sources"]] == [f"{root}/robot"]
    assert [s["shards"] for s in data["val_sources"]] == [f"{root}/heldout/robot"]
    assert prepare["heldout"]["robot"] > 0
    head = config["model"]["init_args"]["model"]["init_args"]["action_head"]["init_args"]
    assert data["horizon"] == prepare["horizon"] == head["horizon"]


def test_a_diverging_fit_stops_at_its_first_non_finite_loss(tmp_path: Path) -> None:
    """Every CLI run carries StopOnNonFiniteLoss (`non_finite_loss`); a learning rate of 1e30 diverges at once."""
    from vla_zoo.callbacks import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"training loss is (nan|inf) at step \d+ .*non_finite_loss"):
        main([*_fit_args(tmp_path), "--model.init_args.lr=1e30", "--trainer.max_steps=20"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_whole_process_group_still_saves_the_checkpoint(tmp_path: Path, signum: int) -> None:
    """Ctrl+C and a scheduler's job kill reach the DataLoader workers too: they must not die of it (the fit would
    fail with "DataLoader worker ... killed by signal" before saving), and the trainer then shuts them down."""
    minimal = yaml.safe_load(Path(MINIMAL).read_text())
    to_group = {"class_path": "tests.vla_zoo.fit_fixtures.SignalAtStep",
                "init_args": {"step": 3, "signum": int(signum), "group": True}}
    overlay = tmp_path / "preempted.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [*minimal["trainer"]["callbacks"], to_group]}}))
    cut = run_cli([*_fit_args(tmp_path), "--trainer.max_steps=8", "--data.init_args.num_workers=2",
                   "--config", str(overlay)], new_session=True)
    assert cut.returncode == 128 + signum, cut.stderr[-3000:]
    assert "killed by signal" not in cut.stderr and "exited unexpectedly" not in cut.stderr, cut.stderr[-3000:]
    assert read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 3


def test_sigterm_saves_a_checkpoint_exits_nonzero_and_ckpt_path_last_resumes(tmp_path: Path) -> None:
    """A preempted fit (SIGTERM after step 3) leaves last.ckpt at step 3 and exits 143; the same command with
    `--ckpt_path last` continues from step 3 (tests/vla_zoo/test_callbacks.py compares the states in detail)."""
    minimal = yaml.safe_load(Path(MINIMAL).read_text())
    signal_at_3 = {"class_path": "tests.vla_zoo.fit_fixtures.SignalAtStep", "init_args": {"step": 3}}
    overlay = tmp_path / "preempted.yaml"
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [*minimal["trainer"]["callbacks"], signal_at_3]}}))
    args = [*_fit_args(tmp_path), "--trainer.max_steps=6"]
    with pytest.raises(FileNotFoundError, match=re.escape(f"no last*.ckpt in ['{tmp_path / 'checkpoints'}']")):
        main([*args, "--ckpt_path", "last"])  # nothing to resume yet: an error naming where it looked
    cut = run_cli([*args, "--config", str(overlay)])
    assert cut.returncode == 143, cut.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["global_step"] == 3
    resumed = run_cli([*args, "--ckpt_path", "last"])  # recipes/minimal.yaml's own callbacks
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stdout + resumed.stderr
    assert read_checkpoint(last)["global_step"] == 6
    # `last` must be this recipe's own: another recipe's checkpoint in the same directory is refused.
    with pytest.raises(ValueError, match=r"a different run wrote \(its recipe differs at \['model.init_args.lr'\]\)"):
        main([*args, "--model.init_args.lr=0.01", "--ckpt_path", "last"])
