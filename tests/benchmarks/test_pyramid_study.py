"""benchmarks/pyramid_study.py: the tier study's stages, held-out evaluation scenes, incremental JSON and its table."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("pyramid_study", REPO_ROOT / "benchmarks" / "pyramid_study.py")
study_module = importlib.util.module_from_spec(spec)
sys.modules["pyramid_study"] = study_module  # dataclasses look their module up
spec.loader.exec_module(study_module)

TINY = ["--tiers", "robot=3", "robot_b=1", "sim=3", "human=1", "neural=2", "--heldout", "robot=1", "sim=1"]


def make_study(**kw) -> "study_module.Study":
    args = dict(runs=REPO_ROOT / "runs" / "x", python="py", pretrain_steps=600, posttrain_steps=200, idm_steps=100,
                batch_size=8, episodes=50, execute_steps=4, eval_seed=1000, videos=0)
    return study_module.Study(**{**args, **kw})


def test_stages_share_b_pretraining_and_carry_the_budget():
    study = make_study()
    known = study_module.arms([10])
    stages = {name: study.stages(name, arm, seed=2) for name, arm in known.items()}
    names = {name: [stage for stage, _, _ in s] for name, s in stages.items()}
    pretrained = ["pretrain", "eval_pretrained", "posttrain", "eval"]
    assert names == {"a": ["posttrain", "eval"], "b": pretrained, "c": pretrained,
                     "d": ["idm", "label", *pretrained], "e10": pretrained}
    folder = lambda name, stage: dict((s, f) for s, f, _ in stages[name])[stage]  # noqa: E731
    assert folder("e10", "pretrain") == folder("b", "pretrain") == study.runs / "b" / "s2" / "pretrain"
    # b's pretrained checkpoint is rolled out once, before post-training, for b and every e arm
    assert folder("e10", "eval_pretrained") == folder("b", "eval_pretrained") == study.runs / "b" / "s2" / "eval_pretrained"
    command = lambda name, stage: dict((s, c) for s, _, c in stages[name])[stage]  # noqa: E731
    assert "--trainer.max_steps=600" in command("c", "pretrain") and "--seed_everything=2" in command("c", "pretrain")
    assert "--trainer.max_steps=200" in command("a", "posttrain") and "--data.init_args.batch_size=8" in command("a", "posttrain")
    assert not any("init_from" in c for c in command("a", "posttrain"))
    assert f"--model.init_args.init_from={folder('c', 'pretrain') / 'checkpoints' / 'last.ckpt'}" in command("c", "posttrain")
    # d pretrains on the labels its own IDM wrote; e10 post-trains on a pyramid of the first 10 robot episodes
    sources = json.loads(next(c for c in command("d", "pretrain") if c.startswith("--data.init_args.sources="))
                         .partition("=")[2])
    assert {s["name"]: s["shards"] for s in sources}["neural_idm"] == str(folder("d", "label") / "neural_idm_point_gripper")
    robot = json.loads(next(c for c in command("e10", "posttrain") if c.startswith("--data.init_args.sources="))
                       .partition("=")[2])
    assert robot == [{"name": "robot", "shards": ".cache/vla_zoo/tabletop_robot10/robot", "embodiment": "point_gripper",
                      "cache": True}]
    assert command("b", "eval")[-6:] == ["--seed", "1000", "--videos", "0", "--out", str(folder("b", "eval"))]
    pre_checkpoint = str(folder("b", "pretrain") / "checkpoints" / "last.ckpt")
    assert command("b", "eval_pretrained")[command("b", "eval_pretrained").index("--checkpoint") + 1] == pre_checkpoint


def test_robot_demos_come_from_the_recipes_preset_unless_tiers_override():
    assert make_study().robot_demos() == 50  # posttrain.yaml names a preset, not an episodes mapping
    assert make_study(tiers={"robot": 3}).robot_demos() == 3


def test_a_clash_between_evaluation_and_pyramid_scenes_is_refused():
    study = make_study(tiers={"robot": 3, "robot_b": 1, "sim": 3, "human": 1, "neural": 2}, heldout={"robot": 1})
    pyramids = study.pyramids([2])
    assert [str(p.root) for p in pyramids] == [".cache/vla_zoo/tabletop_large", ".cache/vla_zoo/tabletop_large_h2",
                                               ".cache/vla_zoo/tabletop_robot2"]
    assert study_module.check_heldout_scenes(pyramids, eval_seed=1000, episodes=50) == (3 + 1 + 3 + 1 + 2 + 1) * 20

    class Clash:
        root = "clash"

        def scene_seeds(self):
            return {min(study_module.evaluation_seeds(1000, 50))}

    with pytest.raises(ValueError, match=r"evaluation scenes \(e.g. world seed \d+\) are scenes of the pyramid at "
                                         r"clash; pick another --eval-seed"):
        study_module.check_heldout_scenes([Clash()], eval_seed=1000, episodes=50)


@pytest.mark.slow  # ~3 s of seed hashing on an idle machine (134,000 world seeds), far more under load
def test_the_studys_evaluation_scenes_are_none_of_its_pyramids_scenes():
    """The study's own setting: the recipes' large pyramid, the IDM's re-cut and the e-arm robot pyramids, every
    retry attempt, against 200 evaluation episodes per family of the default evaluation seed."""
    study = make_study()
    pyramids = study.pyramids([10, 25])
    assert pyramids[0].episodes["sim"] == 3000 and pyramids[0].heldout == {"robot": 20, "sim": 50}
    assert study_module.check_heldout_scenes(pyramids, eval_seed=1000, episodes=200) >= 5620 * 20


def test_fisher_exact_matches_scipy():
    from scipy.stats import fisher_exact

    for k1, n1, k2, n2 in [(6, 50, 0, 50), (20, 50, 14, 50), (0, 20, 0, 20), (5, 20, 2, 20), (150, 150, 0, 10)]:
        expected = fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue
        assert study_module.fisher_exact(k1, n1, k2, n2) == pytest.approx(expected, rel=1e-9), (k1, n1, k2, n2)


def _fake_runs(monkeypatch, rates: dict[str, float]) -> list[str]:
    """run_stage that records what it was asked to run and writes an evaluation with the arm's success rate."""
    calls = []

    def run_stage(label, folder, command):
        calls.append(label)
        if label.split()[-1].startswith("eval"):
            arm, kind = label.split()[0], label.split()[-1].removeprefix("eval")
            if kind == "_pretrained":  # before post-training: half the arm's rate
                k = round(rates[arm] * 10) // 2
            else:
                objects = kind.removeprefix("_objects")
                k = int(objects) if objects else round(rates[arm] * 10)  # level n: n of 10
            folder.mkdir(parents=True, exist_ok=True)
            tasks = {t: {"successes": k, "episodes": 10, "success_rate": k / 10} for t in ("pick_place", "push")}
            (folder / "results.json").write_text(json.dumps({"tasks": tasks}))
        return {"seconds": 60.0, "command": " ".join(command)}

    monkeypatch.setattr(study_module, "run_stage", run_stage)
    monkeypatch.setattr("envs.tabletop.TabletopPyramid.prepare", lambda self: calls.append(f"prepare {self.root}"))
    return calls


def test_results_merge_incrementally_skip_finished_seeds_and_keep_one_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the recipes' cache paths are relative: never the checkout's pyramids
    calls = _fake_runs(monkeypatch, {"a": 0.1, "b": 0.6, "c": 0.5})
    out = tmp_path / "study.json"
    common = ["--out", str(out), "--runs", str(tmp_path / "runs"), "--episodes", "10", *TINY]
    study_module.main(["--arms", "a", "b", "--seeds", "0", "1", *common])
    assert calls == ["prepare .cache/vla_zoo/tabletop_large"] + [
        f"{arm} s{seed} {stage}" for seed in (0, 1) for arm, stages in
        (("a", ["posttrain", "eval"]), ("b", ["pretrain", "eval_pretrained", "posttrain", "eval"]))
        for stage in stages]
    calls.clear()
    data = study_module.main(["--arms", "b", "c", "--seeds", "1", *common])
    assert calls[1:] == ["c s1 pretrain", "c s1 eval_pretrained", "c s1 posttrain", "c s1 eval"]  # b s1: done
    assert {arm: sorted(v["seeds"]) for arm, v in data["arms"].items()} == {"a": ["0", "1"], "b": ["0", "1"],
                                                                          "c": ["1"]}
    entry = data["arms"]["b"]["seeds"]["0"]
    assert (entry["pick_place"], entry["push"], entry["episodes_per_family"], entry["train_minutes"]) == (0.6, 0.6, 10, 2.0)
    assert entry["successes"] == {"pick_place": 6, "push": 6} and entry["demos"] == 3
    assert entry["pretrained"] == {"pick_place": 0.3, "push": 0.3} and "pretrained" not in data["arms"]["a"]["seeds"]["0"]
    assert data["budget"]["posttrain_steps"] == 2000 and data["commands"]["a"][0].split()[1:4] == ["-m", "vla_zoo", "fit"]
    assert "cpu" in data["machine"]
    with pytest.raises(SystemExit, match=r"holds results of another budget .* Pass the same budget flags, or --out"):
        study_module.main(["--arms", "a", "--seeds", "2", "--posttrain-steps", "10", *common])

    capsys.readouterr()
    study_module.main(["--table", "--out", str(out)])
    text = capsys.readouterr().out
    assert ("| b | pretrain on sim + robot_b, post-train on the 50 robot demonstrations | 2 | 0.60 ± 0.00 | 0.60 ± 0.00 "
            "| 0.30 ± 0.00 / 0.30 ± 0.00 |") in text
    assert "| b - a | +0.50, p = " in text and "(12/20 vs 2/20)" in text and "| c - b | -0.10" in text

    # a difficulty level asked for later runs only its evaluations, for every finished entry
    calls.clear()
    data = study_module.main(["--arms", "a", "--seeds", "0", "--objects-levels", "1", "3", *common])
    assert calls[1:] == ["a s0 posttrain", "a s0 eval", "a s0 eval_objects1", "a s0 eval_objects3"]  # fake: no reuse
    assert data["arms"]["a"]["seeds"]["0"]["by_objects"] == {"1": {"pick_place": 0.1, "push": 0.1},
                                                             "3": {"pick_place": 0.3, "push": 0.3}}
    assert "| a | 0.10 / 0.10 | 0.30 / 0.30 |" in study_module.table(data)


def test_tiny_tiers_never_replace_a_cached_pyramid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    large = tmp_path / ".cache" / "vla_zoo" / "tabletop_large" / "sim"
    large.mkdir(parents=True)
    (large / "READY.json").write_text("{}")  # some other pyramid's marker
    with pytest.raises(SystemExit, match=r"--tiers would regenerate .cache/vla_zoo/tabletop_large/sim \(another "
                                         r"size is cached there\); run with --tiers from another working directory"):
        study_module.main(["--arms", "a", "--out", str(tmp_path / "s.json"), *TINY])


@pytest.mark.slow
def test_study_runs_every_arm_end_to_end_at_a_tiny_budget(tmp_path, monkeypatch):
    """Every arm trains (a few steps, through the real recipes and commands, run in this process), evaluates one
    episode per family and lands in the JSON; the tiny pyramids are generated in tmp_path."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "study.json"
    study_module.main(["--arms", "a", "b", "c", "d", "e", "--e-demos", "2", "--seeds", "0", "--pretrain-steps", "2",
                       "--posttrain-steps", "2", "--idm-steps", "2", "--batch-size", "4", "--episodes", "1",
                       "--videos", "0", "--python", study_module.IN_PROCESS, "--out", str(out), *TINY])
    data = json.loads(out.read_text())
    assert sorted(data["arms"]) == ["a", "b", "c", "d", "e2"]
    for name, arm in data["arms"].items():
        entry = arm["seeds"]["0"]
        assert entry["episodes_per_family"] == 1 and set(entry["successes"]) == {"pick_place", "push"}
        assert ("pretrained" in entry) == (name != "a"), name  # every pretrained arm's zero-shot rollout
    assert "| b |" in study_module.table(data) and "before post-training" in study_module.table(data)
    assert data["arms"]["e2"]["seeds"]["0"]["demos"] == 2
    assert (tmp_path / "runs" / "pyramid" / "d" / "s0" / "labels" / "neural_idm_point_gripper" / "source.json").is_file()
