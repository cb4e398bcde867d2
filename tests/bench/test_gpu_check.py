"""benchmarks/gpu_check.py: every step's command is one its script accepts, the resume checks
run for real and compare, and a failing step is recorded without stopping the rest. (The whole
rehearsal, `--device cpu --tiny`, takes several minutes on 2 cores: docs/performance.md.)"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.cli.parsers import build_range_test_parser, build_train_parser
from core.train.recipes import RECIPES
from tests.conftest import write_image_folder

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check  # noqa: E402
import profile_step  # noqa: E402
import race_airbench  # noqa: E402
import throughput  # noqa: E402

STEPS = ["smoke_resnet", "smoke_resnet_fp16", "smoke_resnet_best", "smoke_dilated", "smoke_ultimus", "smoke_fast",
         "eval_only_tta_shift", "range_test_50", "full_resnet", "profile_step", "throughput_vs_seed",
         "full_fast", "race_airbench94",
         "resume_default_straight", "resume_default_interrupted", "resume_default_resumed",
         "resume_deterministic_straight", "resume_deterministic_interrupted", "resume_deterministic_resumed",
         "full_resnet_torchrun",
         "full_resnet_compile_default", "full_resnet_compile_reduce_overhead", "full_resnet_compile_max_autotune"]


def parse(argv):
    """``argv`` parsed by the parser of the script it runs, as that script would (under torchrun:
    the script after the launcher's flags)."""
    argv = [str(a) for a in argv]
    if argv[:2] == ["-m", "torch.distributed.run"]:
        argv = argv[next(i for i, a in enumerate(argv) if a.endswith(".py")):]
    script, flags = argv[0], argv[1:]
    if script.startswith("train_"):
        return build_train_parser(RECIPES[script[len("train_"):-3]]).parse_with_given(flags)[0]
    if script == "lr_range_test.py":
        return build_range_test_parser().parse_with_given(flags)[0]
    if script.endswith("throughput.py"):
        return throughput.build_parser().parse_with_given(flags)[0]
    if script.endswith("race_airbench.py"):
        return race_airbench.build_parser().parse_with_given(flags)[0]
    own, rest = profile_step.build_parser().parse_known_args(flags)
    return build_train_parser(RECIPES[own.model]).parse_with_given(rest)[0]


@pytest.mark.parametrize("tiny", [True, False])
def test_every_step_runs_a_command_its_script_accepts(tmp_path, monkeypatch, tiny):
    data = write_image_folder(tmp_path / "cifar10", n_train=20, n_test=10)
    seen = []

    def record(self, name, argv, cap_s=600, interrupt_after_epoch=None):
        parse(argv)
        seen.append(name)
        step = {"step": name, "rc": 0, "status": "ok", "wall_s": 1.0}
        self.steps.append(step)
        return step

    monkeypatch.setattr(gpu_check.Checker, "run", record)
    argv = ["--device", "cpu", "--data", str(data), "--out", str(tmp_path / "out"), *(["--tiny"] if tiny else [])]
    assert gpu_check.main(argv) == 0
    steps = [name for name in STEPS if not (tiny and name == "race_airbench94")]  # the race needs a whole dataset
    assert seen == steps
    table = (tmp_path / "out" / "summary.md").read_text()
    assert all(f"| {name} | ok |" in table for name in steps)


@pytest.mark.slow
def test_the_resume_checks_interrupt_a_run_and_find_its_resume_identical_on_the_cpu(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "cifar10", n_train=50, n_test=20)  # one step an epoch
    monkeypatch.setattr(gpu_check, "STEP_GROUPS", (gpu_check.resume_steps,))
    # the deterministic mode alone: on the CPU a resume repeats the run exactly either way
    monkeypatch.setattr(gpu_check, "RESUME_MODES", {"deterministic": ["--deterministic"]})
    out = tmp_path / "out"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--data", str(data), "--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ok", "interrupted", "ok"]
    assert all(Path(s["log"]).is_file() for s in report["steps"])
    assert report["figures"]["resume_deterministic_resumed"] == {"interrupted": True, "identical": True,
                                                                 "max_test_loss_diff": 0.0}


@pytest.mark.slow
def test_a_failing_step_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "cifar10", n_train=20, n_test=10)

    def plan(c, args):
        c.run("broken", ["train_resnet.py", "--epochs", "0"])
        c.run("fine", ["train_resnet.py", "--help"])
        return {}

    monkeypatch.setattr(gpu_check, "plan", plan)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    steps = json.loads((tmp_path / "o" / "gpu_check.json").read_text())["steps"]
    assert [(s["step"], s["rc"]) for s in steps] == [("broken", 2), ("fine", 0)]
    assert "failed (rc 2)" in steps[0]["status"]


def test_the_summary_names_the_profiles_three_costliest_ops(tmp_path):
    ops = [{"op": f"kernel{i}", "ms_per_step": 4.0 - i, "share": (4.0 - i) / 10} for i in range(4)]
    log = tmp_path / "profile_step.log"
    log.write_text("a warning\n" + json.dumps({"model": "resnet", "wall_ms_per_step": 10.0, "top_ops": ops}) + "\n")
    checker = SimpleNamespace(steps=[{"step": "profile_step", "rc": 0, "status": "ok", "wall_s": 3.0, "log": str(log)}])
    figures = gpu_check.step_figures(checker)
    assert figures["profile_step"]["top_ops"] == ops  # all of them kept for gpu_check.json
    row = gpu_check.summary_table(checker, figures).splitlines()[-1]
    assert row == "| profile_step | ok | 3.0 | model resnet, wall_ms_per_step 10, top ops kernel0 40%, kernel1 30%, kernel2 20% |"
