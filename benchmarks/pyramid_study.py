"""The tier study: does pretraining on the cheap tiers of the data pyramid make a few robot demonstrations enough?

Every arm trains per seed into ``RUNS/<arm>/s<seed>/`` through ``python -m vla_zoo fit`` subprocesses on the plain
recipes of ``recipes/pyramid/`` with one fixed budget (``--pretrain-steps``, ``--posttrain-steps``, ``--idm-steps``,
``--batch-size``), then is rolled out closed loop by ``python -m vla_zoo.evaluation`` on held-out scenes
(``--episodes`` per task family; their reset seeds are checked disjoint from every scene the pyramids hold):

- ``a``: the robot tier alone (50 demonstrations) from random weights (``scratch.yaml``);
- ``b``: pretrain on ``sim`` + ``robot_b`` (``pretrain_sim.yaml``), post-train on the same robot tier
  (``posttrain.yaml``);
- ``c``: ``b`` plus the ``human`` and ``neural`` tiers with co-trained latent-action targets (``pretrain_latent.yaml``);
- ``d``: ``b`` plus the ``neural`` tier with pseudo-actions of an inverse dynamics model trained on the point
  gripper's labelled tiers (``idm.yaml``, ``label_neural.yaml``, ``pretrain_idm.yaml``);
- ``e<N>``: ``b``'s pretraining checkpoint post-trained on the first N robot demonstrations (``--e-demos``, default
  10 and 25; ``--arms e`` runs them all).

Every pretraining checkpoint is also rolled out as it is, before post-training, on the same scenes (``pretrained``:
did pretraining learn the task at all?). Results merge into ``--out`` (``benchmarks/results/pyramid_study.json``):
``arms -> {description, seeds -> {pick_place, push, pretrained, episodes_per_family, train_minutes, ...}}``, plus
``budget``, ``machine`` and ``commands``. A run is incremental: seeds already in the JSON are skipped, finished stages
(a ``DONE.json`` in their folder) are reused, e.g. ``b``'s pretraining by ``e``; a stage or the JSON is locked while
one process works on it, so seeds may run in parallel processes. ``--table`` prints the markdown table of the JSON:
mean and spread over seeds, and for each difference (b-a, c-b, d-b, e-b) Fisher's exact test on the pooled episodes
and Welch's t-test over seeds. ``--objects-levels 1 2 4 6`` also rolls every arm out with that many objects in each
scene (the target and the rest distractors; the pyramid's scenes hold 2-4), the same episodes otherwise: success per
difficulty level (added to finished entries by running only the missing evaluations).

    python benchmarks/pyramid_study.py --arms a b c --seeds 0 1 2
    python benchmarks/pyramid_study.py --arms d e --seeds 0
    python benchmarks/pyramid_study.py --table

Threads: each subprocess inherits ``OMP_NUM_THREADS`` from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECIPES = REPO / "recipes" / "pyramid"
TASKS = ("pick_place", "push")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "pyramid_study.json"
DIFFERENCES = (("b", "a"), ("c", "b"), ("d", "b"))  # plus every e<N> against b


@dataclass(frozen=True)
class Arm:
    description: str
    pretrain: str | None  # recipe stem of the pretraining (None: from random weights); "idm" adds the IDM stages
    demos: int | None  # robot demonstrations post-trained on (None: the pyramid's whole robot tier)


def arms(e_demos: Sequence[int]) -> dict[str, Arm]:
    table = {
        "a": Arm("the robot tier alone (50 demonstrations), from random weights", None, None),
        "b": Arm("pretrain on sim + robot_b, post-train on the 50 robot demonstrations", "pretrain_sim", None),
        "c": Arm("b plus the human and neural tiers with co-trained latent-action targets in pretraining",
                 "pretrain_latent", None),
        "d": Arm("b plus the neural tier with inverse-dynamics pseudo-actions in pretraining", "pretrain_idm", None),
    }
    for n in e_demos:
        table[f"e{n}"] = Arm(f"b's pretraining, post-trained on the first {n} robot demonstrations", "pretrain_sim", n)
    return table


# ----------------------------------------------------------------------------------------------------- recipes


def recipe(stem: str) -> str:
    """A study recipe's path, relative to the working directory when it lies below it (shorter commands)."""
    path = RECIPES / f"{stem}.yaml"
    rel = os.path.relpath(path)
    return path.as_posix() if rel.startswith("..") else rel


def recipe_data(stem: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((RECIPES / f"{stem}.yaml").read_text())["data"]["init_args"]


def _flag(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass
class Study:
    """One invocation's settings: where runs go, the budget, and (tests only) tier sizes overriding the recipes'."""

    runs: Path
    python: str
    pretrain_steps: int
    posttrain_steps: int
    idm_steps: int
    batch_size: int
    episodes: int
    execute_steps: int
    eval_seed: int
    videos: int
    tiers: dict[str, int] | None = None
    heldout: dict[str, int] | None = None
    objects_levels: tuple[int, ...] = ()

    @property
    def budget(self) -> dict[str, Any]:
        return {"pretrain_steps": self.pretrain_steps, "posttrain_steps": self.posttrain_steps,
                "idm_steps": self.idm_steps, "batch_size": self.batch_size, "episodes_per_family": self.episodes,
                "execute_steps": self.execute_steps, "eval_seed": self.eval_seed,
                **({"tiers": self.tiers, "heldout": self.heldout} if self.tiers else {})}

    # -- the pyramids the recipes prepare, with the tier overrides

    def prepare_args(self, stem: str) -> dict[str, Any]:
        from envs.tabletop import TIERS

        args = dict(recipe_data(stem)["prepare"]["init_args"])
        if self.tiers:  # every tier named, so nothing falls back to the preset's sizes
            tiers = {tier: self.tiers.get(tier, 0) for tier in TIERS}
            heldout = {tier: (self.heldout or {}).get(tier, 0) for tier in TIERS}
            if stem == "idm":  # the IDM's horizon-2 cut of the labelled point-gripper tiers
                args["episodes"] = {**{tier: 0 for tier in TIERS}, "robot": tiers["robot"],
                                    "sim": min(tiers["sim"], args["episodes"]["sim"])}
                args["heldout"] = {**{tier: 0 for tier in TIERS}, "robot": heldout["robot"]}
            else:
                args["episodes"], args["heldout"] = tiers, heldout
        return args

    def robot_demos(self) -> int:
        """Robot demonstrations the post-training recipe's pyramid holds (its preset's, unless ``tiers`` override)."""
        from envs.tabletop import TabletopPyramid

        return TabletopPyramid(**self.prepare_args("posttrain")).episodes["robot"]

    def pyramid_flags(self, stem: str) -> list[str]:
        if not self.tiers:
            return []
        args = self.prepare_args(stem)
        return [f"--data.init_args.prepare.init_args.episodes={_flag(args['episodes'])}",
                f"--data.init_args.prepare.init_args.heldout={_flag(args['heldout'])}"]

    def robot_pyramid(self, demos: int):
        """The first ``demos`` robot episodes of the study's pyramid seed, alone in a pyramid of their own."""
        from envs.tabletop import TabletopPyramid

        main = self.prepare_args("posttrain")
        root = str(Path(main["root"]).parent / f"tabletop_robot{demos}")
        counts = {tier: 0 for tier in ("robot_b", "sim", "human", "neural")}
        return TabletopPyramid(root=root, seed=main.get("seed", 0), episodes={"robot": demos, **counts}, heldout={},
                               num_workers=1, progress=False)

    def pyramids(self, demos: Sequence[int] = ()) -> list:
        from envs.tabletop import TabletopPyramid

        found = [TabletopPyramid(**self.prepare_args(stem)) for stem in ("posttrain", "idm")]
        return found + [self.robot_pyramid(n) for n in demos]

    # -- commands

    def fit(self, stem: str, out: Path, seed: int, steps: int, *extra: str) -> list[str]:
        val_every = steps // 4 if steps >= 400 else steps
        return [self.python, "-m", "vla_zoo", "fit", "--config", recipe(stem), f"--seed_everything={seed}",
                f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={val_every}",
                f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
                f"--data.init_args.batch_size={self.batch_size}", f"--data.init_args.seed={seed}",
                *self.pyramid_flags(stem), *extra]

    def label(self, out: Path, seed: int, idm_checkpoint: Path) -> list[str]:
        labelers = [{"class_path": "lit_modules.labeling.CheckpointIDMLabeler",
                     "init_args": {"checkpoint": str(idm_checkpoint), "embodiment": "point_gripper", "num_samples": 8}}]
        return [self.python, "-m", "vla_zoo", "predict", "--config", recipe("label_neural"),
                f"--seed_everything={seed}", f"--trainer.default_root_dir={out}",
                f"--trainer.logger.init_args.save_dir={out}", f"--model.init_args.output_dir={out}",
                f"--model.init_args.labelers={_flag(labelers)}"]

    def evaluate(self, checkpoint: Path, out: Path, objects: int | None = None) -> list[str]:
        return [self.python, "-m", "vla_zoo.evaluation", "--env", "tabletop", "--embodiment", "point_gripper",
                "--checkpoint", str(checkpoint), "--episodes", str(self.episodes), "--execute-steps",
                str(self.execute_steps), "--seed", str(self.eval_seed), "--videos", str(self.videos),
                *(["--objects", str(objects)] if objects is not None else []), "--out", str(out)]

    def stages(self, name: str, arm: Arm, seed: int) -> list[tuple[str, Path, list[str]]]:
        """The (stage, folder, command) list of one arm and seed, in order; a stage may belong to another arm."""
        run = self.runs / name / f"s{seed}"
        stages = []
        checkpoint = lambda folder: folder / "checkpoints" / "last.ckpt"  # noqa: E731
        post_extra: list[str] = []
        if arm.pretrain is not None:
            owner = "b" if arm.pretrain == "pretrain_sim" else name
            pre = self.runs / owner / f"s{seed}" / "pretrain"
            pre_extra: list[str] = []
            if arm.pretrain == "pretrain_idm":
                idm, labels = run / "idm", run / "labels"
                stages.append(("idm", idm, self.fit("idm", idm, seed, self.idm_steps)))
                stages.append(("label", labels, self.label(labels, seed, checkpoint(idm))))
                sources = recipe_data("pretrain_idm")["sources"]
                for source in sources:
                    if source["name"] == "neural_idm":
                        source["shards"] = str(labels / "neural_idm_point_gripper")
                pre_extra.append(f"--data.init_args.sources={_flag(sources)}")
            stages.append(("pretrain", pre, self.fit(arm.pretrain, pre, seed, self.pretrain_steps, *pre_extra)))
            # Before post-training, on the robot's held-out scenes: did pretraining learn the task at all?
            zero_shot = pre.parent / "eval_pretrained"
            stages.append(("eval_pretrained", zero_shot, self.evaluate(checkpoint(pre), zero_shot)))
            post_extra.append(f"--model.init_args.init_from={checkpoint(pre)}")
        if arm.demos is not None:
            sources = recipe_data("posttrain")["sources"]
            for source in sources:
                if source["name"] == "robot":
                    source["shards"] = self.robot_pyramid(arm.demos).sources["robot"]
            post_extra.append(f"--data.init_args.sources={_flag(sources)}")
        post = run / "posttrain"
        stem = "scratch" if arm.pretrain is None else "posttrain"
        stages.append(("posttrain", post, self.fit(stem, post, seed, self.posttrain_steps, *post_extra)))
        stages.append(("eval", run / "eval", self.evaluate(checkpoint(post), run / "eval")))
        for n in self.objects_levels:  # the difficulty knob: the same episodes with n objects in every scene
            folder = run / f"eval_objects{n}"
            stages.append((f"eval_objects{n}", folder, self.evaluate(checkpoint(post), folder, objects=n)))
        return stages


# ------------------------------------------------------------------------------------- held-out evaluation scenes


def evaluation_seeds(eval_seed: int, episodes: int) -> set[int]:
    """The reset seeds of the evaluator's episodes (``vla_zoo.evaluation.episode_seed``), every task family."""
    from vla_zoo.evaluation import episode_seed

    return {episode_seed(eval_seed, task, i) for task in TASKS for i in range(episodes)}


def check_heldout_scenes(pyramids: Sequence[Any], eval_seed: int, episodes: int) -> int:
    """Raise unless no evaluation episode starts from a scene any pyramid may hold (every tier, held-out split and
    retry attempt: ``TabletopPyramid.scene_seeds``). ``TabletopEnv.reset(seed=s)`` builds the scene of world seed
    ``s``, so disjoint seeds are disjoint scenes. The evaluator's seeds are 32-bit hashes on a stream of their own and
    the tiers' 63-bit hashes of (seed, tier, index, attempt): a collision is unlikely, and this proves there is none.
    Returns how many tier seeds were checked."""
    evaluation = evaluation_seeds(eval_seed, episodes)
    seen: set[int] = set()
    for pyramid in pyramids:
        seeds = pyramid.scene_seeds()
        shared = evaluation & seeds
        if shared:
            raise ValueError(f"evaluation seed {eval_seed}: {len(shared)} evaluation scenes (e.g. world seed "
                             f"{min(shared)}) are scenes of the pyramid at {pyramid.root}; pick another --eval-seed")
        seen |= seeds
    return len(seen)


# ----------------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created), held across processes for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: ``--python`` value that runs each stage's module in this process: the smoke test's stages then skip the
#: interpreter start and imports that dominate a few-step stage.
IN_PROCESS = "inprocess"


def run_module_in_process(module: str, args: list[str], log) -> int:
    """``python -m module args`` in this process, output into ``log``; returns the exit status."""
    import runpy
    import traceback

    argv = sys.argv
    sys.argv = [module, *args]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
            except Exception:  # noqa: BLE001 - a failed stage is reported like a failed subprocess
                traceback.print_exc(file=log)
                return 1
        return 0
    finally:
        sys.argv = argv


def run_stage(label: str, folder: Path, command: list[str]) -> dict[str, Any]:
    """Run one stage unless its ``DONE.json`` exists; returns that record (seconds, command). A stage that did not
    finish is started again from scratch; its log is ``stage.log`` in its folder."""
    done = folder / "DONE.json"
    with locked(folder.parent / f".{folder.name}.lock"):
        if done.is_file():
            print(f"[{label}] done before: {folder}", flush=True)
            return json.loads(done.read_text())
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        print(f"[{label}] running: {shlex.join(command)}", flush=True)
        start = time.perf_counter()
        with open(folder / "stage.log", "w") as log:
            if command[0] == IN_PROCESS:
                rc = run_module_in_process(command[2], command[3:], log)
            else:
                rc = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
        if rc != 0:
            tail = (folder / "stage.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"[{label}] exit {rc} after {seconds:.0f} s: {shlex.join(command)}\n"
                               f"last lines of {folder / 'stage.log'}:\n" + "\n".join(tail))
        record = {"seconds": round(seconds, 1), "command": shlex.join(command)}
        done.write_text(json.dumps(record, indent=1))
        print(f"[{label}] finished in {seconds / 60:.1f} min", flush=True)
        return record


def run_arm(study: Study, name: str, arm: Arm, seed: int) -> dict[str, Any]:
    """Train and evaluate one arm and seed; returns its JSON entry."""
    records = {}
    for stage, folder, command in study.stages(name, arm, seed):
        records[stage] = (folder, run_stage(f"{name} s{seed} {stage}", folder, command))
    results = json.loads((records["eval"][0] / "results.json").read_text())
    tasks = results["tasks"]
    minutes = {stage: round(rec["seconds"] / 60, 2) for stage, (_, rec) in records.items()}
    train = [stage for stage in minutes if not stage.startswith("eval")]
    pretrained = {}
    if "eval_pretrained" in records:
        zero_shot = json.loads((records["eval_pretrained"][0] / "results.json").read_text())["tasks"]
        pretrained = {task: zero_shot[task]["success_rate"] for task in TASKS}
    by_objects = {}
    for n in study.objects_levels:
        level = json.loads((records[f"eval_objects{n}"][0] / "results.json").read_text())["tasks"]
        by_objects[str(n)] = {task: level[task]["success_rate"] for task in TASKS}
    return {
        **{task: tasks[task]["success_rate"] for task in TASKS},
        "successes": {task: tasks[task]["successes"] for task in TASKS},
        "episodes_per_family": study.episodes,
        "demos": arm.demos if arm.demos is not None else study.robot_demos(),
        "train_minutes": round(sum(minutes[s] for s in train), 2),
        "stage_minutes": minutes,
        "pretrain_run": str(records["pretrain"][0]) if "pretrain" in records else None,
        "checkpoint": str(records["posttrain"][0] / "checkpoints" / "last.ckpt"),
        "commands": [rec["command"] for _, rec in records.values()],
        **({"pretrained": pretrained} if pretrained else {}),
        **({"by_objects": by_objects} if by_objects else {}),
    }


def merge(out: Path, study: Study, name: str, arm: Arm, seed: int, entry: dict[str, Any]) -> None:
    """Add one arm/seed entry to the JSON at ``out`` (under its lock), keeping every other entry."""
    from vla_zoo.machine import describe

    with locked(out.with_suffix(".lock")):
        data = load(out, study)
        record = data["arms"].setdefault(name, {"description": arm.description, "seeds": {}})
        record["description"] = arm.description
        record["seeds"][str(seed)] = entry
        record["seeds"] = dict(sorted(record["seeds"].items(), key=lambda kv: int(kv[0])))
        data["arms"] = dict(sorted(data["arms"].items()))
        data["budget"] = study.budget
        data["machine"] = {**describe(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        data["commands"][name] = record["seeds"][min(record["seeds"], key=int)]["commands"]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, out)


def load(out: Path, study: Study | None = None) -> dict[str, Any]:
    """The study's JSON (an empty one if absent); with ``study``, refuse results of another budget."""
    data = json.loads(out.read_text()) if out.is_file() else {}
    data.setdefault("arms", {})
    data.setdefault("commands", {})
    if study is not None and data.get("budget") not in (None, study.budget):
        raise SystemExit(f"{out} holds results of another budget {data['budget']}; this run's is {study.budget}. "
                         "Pass the same budget flags, or --out another file")
    return data


# ----------------------------------------------------------------------------------------------------- the table


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p of Fisher's exact test on [[k1, n1 - k1], [k2, n2 - k2]]: the probability, with the margins fixed,
    of a table at most as likely as the observed one."""
    total, successes = n1 + n2, k1 + k2
    denominator = math.comb(total, successes)

    def p(k: int) -> float:
        return math.comb(n1, k) * math.comb(n2, successes - k) / denominator

    observed = p(k1)
    lo, hi = max(0, successes - n2), min(successes, n1)
    return min(1.0, sum(q for q in map(p, range(lo, hi + 1)) if q <= observed * (1 + 1e-7)))


def welch_p(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Two-sided p of Welch's t-test over per-seed rates (None with fewer than 2 seeds a side, no spread, or no
    scipy)."""
    if len(x) < 2 or len(y) < 2 or (len(set(x)) == 1 and len(set(y)) == 1):
        return None
    try:
        from scipy.stats import ttest_ind
    except ImportError:
        return None
    return float(ttest_ind(x, y, equal_var=False).pvalue)


def _spread(values: Sequence[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.2f}"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.2f} ± {sd:.2f}"


def table(data: dict[str, Any]) -> str:
    """The markdown table of the study's JSON: per arm mean ± standard deviation over seeds, then each difference."""
    arms_ = data["arms"]
    lines = ["| arm | what | seeds | pick_place | push | before post-training: pick_place / push "
             "| train minutes (mean) |", "|---|---|---|---|---|---|---|"]
    for name, arm in arms_.items():
        seeds = list(arm["seeds"].values())
        if not seeds:
            continue
        zero_shot = [s["pretrained"] for s in seeds if "pretrained" in s]
        before = " / ".join(_spread([z[task] for z in zero_shot]) for task in TASKS) if zero_shot else "-"
        row = [name, arm["description"], str(len(seeds)), _spread([s["pick_place"] for s in seeds]),
               _spread([s["push"] for s in seeds]), before,
               f"{sum(s['train_minutes'] for s in seeds) / len(seeds):.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    pairs = [p for p in DIFFERENCES] + [(n, "b") for n in arms_ if n.startswith("e")]
    pairs = [(x, y) for x, y in pairs if arms_.get(x, {}).get("seeds") and arms_.get(y, {}).get("seeds")]
    if pairs:
        lines += ["", "| difference | pick_place: change, Fisher p (pooled episodes), Welch p (seeds) | push: same |",
                  "|---|---|---|"]
    for x, y in pairs:
        cells = []
        for task in TASKS:
            sx, sy = list(arms_[x]["seeds"].values()), list(arms_[y]["seeds"].values())
            rx, ry = [s[task] for s in sx], [s[task] for s in sy]
            kx, nx = sum(s["successes"][task] for s in sx), sum(s["episodes_per_family"] for s in sx)
            ky, ny = sum(s["successes"][task] for s in sy), sum(s["episodes_per_family"] for s in sy)
            change = sum(rx) / len(rx) - sum(ry) / len(ry)
            welch = welch_p(rx, ry)
            cells.append(f"{change:+.2f}, p = {fisher_exact(kx, nx, ky, ny):.3g} ({kx}/{nx} vs {ky}/{ny}), "
                         f"{'n/a' if welch is None else f'{welch:.3g}'}")
        lines.append(f"| {x} - {y} | " + " | ".join(cells) + " |")
    levels = sorted({n for arm in arms_.values() for s in arm["seeds"].values() for n in s.get("by_objects", {})},
                    key=int)
    if levels:
        lines += ["", "| arm | " + " | ".join(f"{n} objects: pick_place / push" for n in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for name, arm in arms_.items():
            seeds = [s["by_objects"] for s in arm["seeds"].values() if "by_objects" in s]
            if seeds:
                cells = [" / ".join(_spread([s[n][task] for s in seeds if n in s]) if any(n in s for s in seeds)
                                    else "-" for task in TASKS) for n in levels]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    budget = data.get("budget")
    if budget:
        lines += ["", "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items())]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- CLI


def _counts(items: Sequence[str] | None, flag: str) -> dict[str, int] | None:
    if not items:
        return None
    out = {}
    for item in items:
        tier, _, n = item.partition("=")
        if not n.isdigit():
            raise SystemExit(f"{flag} takes TIER=COUNT items (e.g. {flag} robot=4 sim=8), got {item!r}")
        out[tier] = int(n)
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python benchmarks/pyramid_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=["a", "b", "c", "d", "e"],
                        help="a b c d e (e: every --e-demos count) or e<N>")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--pretrain-steps", type=int, default=6000)
    parser.add_argument("--posttrain-steps", type=int, default=2000, help="also arm a's steps from random weights")
    parser.add_argument("--idm-steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=50, help="evaluation episodes per task family")
    parser.add_argument("--execute-steps", type=int, default=4, help="actions of each chunk run before replanning")
    parser.add_argument("--eval-seed", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=1, help="GIFs recorded per task family")
    parser.add_argument("--e-demos", nargs="+", type=int, default=[10, 25])
    parser.add_argument("--objects-levels", nargs="+", type=int, default=[],
                        help="also evaluate with N objects in every scene (the target and N-1 distractors), per N")
    parser.add_argument("--runs", default="runs/pyramid", help="run folders: RUNS/<arm>/s<seed>/")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--python", default=sys.executable, help=f"interpreter of the training subprocesses ({IN_PROCESS!r}: run the stages in this process)")
    parser.add_argument("--tiers", nargs="+", metavar="TIER=N", help="override the recipes' tier sizes (tests)")
    parser.add_argument("--heldout", nargs="+", metavar="TIER=N", help="override the held-out sizes (with --tiers)")
    parser.add_argument("--force", action="store_true", help="rerun arm/seeds already in the JSON (stages reused)")
    parser.add_argument("--dry-run", action="store_true", help="print every stage's command and stop")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and stop")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if args.table:
        data = load(out)
        print(table(data))
        return data
    study = Study(Path(args.runs), args.python, args.pretrain_steps, args.posttrain_steps, args.idm_steps,
                  args.batch_size, args.episodes, args.execute_steps, args.eval_seed, args.videos,
                  _counts(args.tiers, "--tiers"), _counts(args.heldout, "--heldout"), tuple(args.objects_levels))
    known = arms(args.e_demos)
    names = [n for a in args.arms for n in ([k for k in known if k.startswith("e")] if a == "e" else [a])]
    for n in names:
        if n not in known and not (n[:1] == "e" and n[1:].isdigit()):
            raise SystemExit(f"--arms: unknown arm {n!r}; choose from a b c d e or e<N>")
        known.setdefault(n, arms([int(n[1:])])[n] if n not in known else known[n])
    selected = {n: known[n] for n in dict.fromkeys(names)}
    demos = sorted({a.demos for a in selected.values() if a.demos is not None})
    if study.tiers:  # the recipes' cache paths are fixed: tiny tiers must not replace a real pyramid found there
        for pyramid in study.pyramids(demos)[:2]:
            clash = [t for t in pyramid.episodes if (pyramid.root / t / "READY.json").is_file() and not pyramid.is_ready(t)]
            if clash:
                raise SystemExit(f"--tiers would regenerate {pyramid.root}/{clash[0]} (another size is cached there); "
                                 "run with --tiers from another working directory")
    checked = check_heldout_scenes(study.pyramids(demos), study.eval_seed, study.episodes)
    print(f"evaluation scenes: {2 * study.episodes} reset seeds, disjoint from the {checked} scene seeds of the "
          "study's pyramids", flush=True)
    if args.dry_run:
        for name, arm in selected.items():
            for seed in args.seeds:
                for stage, folder, command in study.stages(name, arm, seed):
                    print(f"# {name} s{seed} {stage} -> {folder}\n{shlex.join(command)}")
        return {}
    data = load(out, study)
    # generated once, up front (a no-op when cached): the labelling stage reads the neural tier without preparing it
    pyramids = study.pyramids(demos)
    for pyramid in pyramids[:1] + (pyramids[1:2] if "d" in selected else []) + pyramids[2:]:
        pyramid.prepare()
    for seed in args.seeds:
        for name, arm in selected.items():
            entry = data["arms"].get(name, {}).get("seeds", {}).get(str(seed))
            # an entry counts as finished if it has every difficulty level asked for (finished stages are reused)
            if entry and set(map(str, study.objects_levels)) <= set(entry.get("by_objects", {})) and not args.force:
                print(f"[{name} s{seed}] in {out} already: skipped", flush=True)
                continue
            entry = run_arm(study, name, arm, seed)
            merge(out, study, name, arm, seed, entry)
            print(f"[{name} s{seed}] pick_place {entry['pick_place']:.2f}, push {entry['push']:.2f} "
                  f"({entry['episodes_per_family']} episodes each), {entry['train_minutes']:.1f} min of training",
                  flush=True)
    data = load(out)
    print(table(data))
    return data


if __name__ == "__main__":
    main()
