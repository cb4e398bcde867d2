"""Flag values, --help texts, and docs/flags.md against the parsers it is generated from."""

import argparse
import importlib.util
from pathlib import Path

import pytest

from core.cli.flags_doc import flags_markdown
from core.cli.parsers import script_parsers
from core.flags import non_negative_float, non_negative_int, positive_float, positive_int
from core.train.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[2]


def options(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_docs_flags_md_is_what_the_parsers_generate():
    expected = flags_markdown(script_parsers())
    assert (ROOT / "docs" / "flags.md").read_text() == expected, \
        "docs/flags.md is stale: run python -m core.cli.flags_doc > docs/flags.md"


@pytest.mark.parametrize("script", sorted(script_parsers()))
def test_every_flag_of_every_script_is_on_the_page_with_its_help(script):
    page = (ROOT / "docs" / "flags.md").read_text()
    section = page.split(f"## `{script}`")[1].split("\n## ")[0]
    for action in options(script_parsers()[script]):
        assert action.help, f"{script} {action.option_strings[0]} has no help text"
        assert all(f"`{o}`" in section for o in action.option_strings), action.option_strings


def test_the_benchmark_flags_are_documented_beside_the_benchmark():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "performance.md").read_text()
    for action in options(module.build_parser()):
        assert action.help and f"`{action.option_strings[0]}`" in page, action.option_strings


@pytest.mark.parametrize("script", sorted(script_parsers()))
def test_help_shows_every_default_a_flag_has(script):
    """A default of 0 equals False, which once hid it; only None (the help says what happens)
    and an off switch show none."""
    parser = script_parsers()[script]
    formatter = parser._get_formatter()
    for action in options(parser):
        if action.default is None or action.default is False:
            continue
        assert "default" in formatter._expand_help(action), f"{script} {action.option_strings[0]}"
    seed = [a for a in options(parser) if a.dest == "seed"]
    assert not seed or "(default: 0)" in formatter._expand_help(seed[0])


@pytest.mark.parametrize("parse", [positive_float, non_negative_float])
@pytest.mark.parametrize("text", ["abc", "", "1,5"])
def test_float_flags_name_a_non_number_the_same_way(parse, text):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{text!r} is not a number$"):
        parse(text)


@pytest.mark.parametrize("parse", [positive_float, non_negative_float])
@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_float_flags_refuse_what_is_not_finite(parse, text):
    """nan compares false with everything, so it passed 'must not be negative'."""
    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        parse(text)


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "must be positive"), (positive_int, "2.5", "is not a whole number"),
    (non_negative_int, "-1", "must not be negative"), (positive_float, "0", "must be positive"),
    (non_negative_float, "-0.1", "must not be negative"),
])
def test_range_checks(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)
    assert parse("3") == 3


@pytest.mark.parametrize("epochs, given, expected", [(24, None, 5.0), (12, None, 2.5), (48, None, 5.0),
                                                     (24, 7.5, 7.5)])
def test_the_peak_epoch_is_derived_not_written_back(epochs, given, expected):
    training = TrainingConfig(epochs=epochs, max_at_epoch=given)
    assert training.peak_epoch == expected
    assert training.max_at_epoch == given
