"""What a run derives from its flags stays out of them, what a resume takes from where, and the
LR bounds of --lr-max find: found once, kept beside the flags, resumed without a new sweep."""

import functools
import json
import re
from pathlib import Path

import pytest
import torch

import train_ultimus
from core.cli.flags_doc import flags_markdown
from core.cli.parsers import build_train_parser, parse_run_config, script_parsers
from core.runs.checkpoint import load_checkpoint
from core.runs.resume import CommandLine, merge_resume_flags, rng_state, set_rng_state
from core.train import loop, lr_bounds
from core.train.recipes import RECIPES
from tests.conftest import ctrl_c_in_second_epoch, metrics, one_error_line, tiny_run

ROOT = Path(__file__).resolve().parents[2]
HISTORY = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")


@pytest.fixture(scope="module")
def data(cifar):
    return cifar(100, 50)


tiny = functools.partial(tiny_run, epochs=3)


def history(out):
    return [tuple(h[k] for k in HISTORY) for h in metrics(out)["history"]]


def interrupt_after_first_epoch(data, out, monkeypatch, *flags, script=train_ultimus):
    with ctrl_c_in_second_epoch(monkeypatch):
        assert script.main(tiny(data, out, *flags)) == 130
    assert load_checkpoint(out / "last.pt")["epoch"] == 1


WHERE_AND_HOW = {"data", "cache_dir", "out", "overwrite", "device", "no_progress", "resume", "eval_only", "compile",
                 "save_every"}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_resume_takes_where_and_how_to_run_from_the_command_line_and_no_training_flag(name):
    assert build_train_parser(RECIPES[name]).resumable() == WHERE_AND_HOW


def test_the_flags_page_names_exactly_the_flags_a_resume_takes():
    section = flags_markdown(script_parsers()).split("## Resume")[1]
    assert set(re.findall(r"`(--[a-z-]+)`", section)) == {"--" + d.replace("_", "-") for d in WHERE_AND_HOW}


def test_a_resume_takes_where_and_how_from_the_command_line_and_the_rest_from_the_checkpoint():
    parser = build_train_parser(RECIPES["ultimus"])
    saved, _ = parser.parse_with_given(["--epochs", "3", "--data", "old", "--seed", "7"])
    del saved["flip"]  # a checkpoint older than the flag
    typed, _ = parser.parse_with_given(["--resume", "x/last.pt", "--epochs", "9", "--data", "new", "--no-progress"])
    merged = merge_resume_flags(typed, saved, parser.resumable())
    assert (merged["epochs"], merged["seed"]) == (3, 7)
    assert (merged["data"], merged["resume"], merged["no_progress"]) == ("new", "x/last.pt", True)
    assert merged["out"] is None and merged["flip"] == "random"
    assert typed["epochs"] == 9, "the parsed flags are not rewritten"


@pytest.mark.slow
def test_a_run_leaves_its_parsed_flags_alone_and_records_them_as_typed(data, tmp_path):
    recipe = RECIPES["ultimus"]
    config = parse_run_config(recipe, tiny(data, tmp_path, "--lr-max", "find", "--num-iter", "20"))
    assert loop.run_training(recipe, config, CommandLine("python train_ultimus.py ...")) == 0
    m, ckpt = metrics(tmp_path), load_checkpoint(tmp_path / "last.pt")
    found = json.loads((tmp_path / "lr_finder.json").read_text())
    assert m["flags"] == config.flags() == ckpt["args"] and m["flags"]["lr_max"] == "find"
    assert m["flags"]["max_at_epoch"] is None and m["peak_epoch"] == pytest.approx(3 * 5 / 24)
    assert ckpt["lr_bounds"] == {"lr_max": found["lr_max"], "lr_min": found["lr_min"], "source": m["lr_source"]}
    assert (m["lr_max"], m["lr_min"]) == (found["lr_max"], found["lr_min"])


@pytest.mark.slow
def test_lr_max_find_trains_exactly_as_its_bounds_given_as_flags(data, tmp_path):
    """The sweep draws batches and augmentations from the loader's generators; they are put back,
    so training after it is the training the found bounds get on their own."""
    found_out, given_out = tmp_path / "found", tmp_path / "given"
    assert train_ultimus.main(tiny(data, found_out, "--lr-max", "find", "--num-iter", "20")) == 0
    m = metrics(found_out)
    assert train_ultimus.main(tiny(data, given_out, "--lr-max", repr(m["lr_max"]), "--lr-min", repr(m["lr_min"]))) == 0
    assert history(found_out) == history(given_out)


@pytest.mark.slow
def test_an_interrupted_lr_max_find_run_resumes_without_a_new_sweep(data, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_ultimus.main(tiny(data, straight, "--lr-max", "find", "--num-iter", "20")) == 0
    interrupt_after_first_epoch(data, resumed, monkeypatch, "--lr-max", "find", "--num-iter", "20")
    monkeypatch.setattr(lr_bounds, "find_bounds", lambda *a, **k: pytest.fail("swept again on resume"))
    assert train_ultimus.main(["--resume", str(resumed / "last.pt"), "--no-progress"]) == 0
    assert history(resumed) == history(straight)
    assert metrics(resumed)["lr_source"] == metrics(straight)["lr_source"]


def test_a_checkpoint_of_the_earlier_format_gets_one_line_naming_the_commit_that_reads_it(tmp_path, capsys):
    path = tmp_path / "last.pt"
    torch.save({"format": "cifar-toolkit-checkpoint-v1", "model_name": "ultimus", "args": {}}, path)
    for command in (["--resume", str(path)], ["--eval-only", "--resume", str(path), "--data", str(tmp_path)]):
        assert train_ultimus.main([*command, "--device", "cpu", "--no-progress"]) == 1
        line = one_error_line(capsys)
        assert "earlier version" in line and "ea80de1" in line
    assert not [p for p in tmp_path.iterdir() if p != path], "nothing written"


@pytest.mark.slow
def test_a_one_step_warm_up_trains(data, tmp_path):
    """One batch per epoch and the peak after the first epoch: the warm-up phase has no length."""
    out = tmp_path / "one-step"
    args = tiny(data, out, "--batch-size", "100", "--max-at-epoch", "1", "--lr-max", "0.003", "--lr-min", "0.0003")
    assert train_ultimus.main(args) == 0
    assert [h["lr"] for h in metrics(out)["history"]] == pytest.approx([0.003, 0.00165, 0.0003])


def test_no_default_cuda_generator_is_saved_so_the_gpu_count_may_differ_on_resume(monkeypatch):
    """Nothing in training draws from the default CUDA generators (one per GPU): saving their
    states made a checkpoint from a machine with more GPUs fail to resume."""
    order, aug = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved CUDA states"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restored CUDA states"))
    state = rng_state(order, aug)
    assert set(state) == {"torch", "order", "aug", "aug_device"}
    set_rng_state(state, order, aug, "last.pt")
