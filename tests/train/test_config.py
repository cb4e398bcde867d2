"""The run's config: every flag a field of one part, read back from its plain values, frozen."""

import dataclasses

import pytest

from core.cli.parsers import build_train_parser, parse_run_config
from core.errors import UserError
from core.train.config import RUN_PARTS
from core.train.recipes import RECIPES


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_flag_of_a_train_script_is_a_field_of_exactly_one_part(name):
    recipe = RECIPES[name]
    config = parse_run_config(recipe, [])
    parts = [set(f.name for f in dataclasses.fields(part)) for part in RUN_PARTS.values()]
    parts += [set(config.augment), set(config.model)]
    flags = {flag.dest for flag in build_train_parser(recipe).flags}
    # "preset" is a field of the training part that a recipe without presets has no flag for
    assert set().union(*parts) - flags <= {"preset"} and flags <= set().union(*parts)
    assert sum(len(p) for p in parts) == len(set().union(*parts)), "no dest in two parts"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_config_reads_back_from_its_plain_values_as_a_checkpoint_keeps_them(name):
    recipe = RECIPES[name]
    config = parse_run_config(recipe, ["--epochs", "7", "--seed", "3", "--tta-shift", "2"])
    flags = config.flags()
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in flags.values())
    assert recipe.config(flags) == config
    assert (config.training.epochs, config.runtime.seed, config.evaluation.tta_shift) == (7, 3, 2)


def test_a_config_is_frozen_and_replace_makes_a_new_one():
    config = parse_run_config(RECIPES["ultimus"], ["--seed", "1"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.runtime.seed = 2
    with pytest.raises(TypeError):
        config.model["residual"] = True
    other = config.replace(seed=5, residual=True)
    assert (other.runtime.seed, other.model["residual"]) == (5, True)
    assert (config.runtime.seed, config.model["residual"]) == (1, False)


def test_a_flag_this_version_does_not_know_is_refused_in_one_line():
    with pytest.raises(UserError, match="^warp_speed: not flags of this recipe"):
        RECIPES["resnet"].config({**parse_run_config(RECIPES["resnet"], []).flags(), "warp_speed": 9})


def test_a_flag_a_checkpoint_lacks_takes_its_default():
    flags = parse_run_config(RECIPES["resnet"], []).flags()
    del flags["flip"], flags["cutout_size"]
    config = RECIPES["resnet"].config(flags)
    assert config.training.flip == "random" and "cutout_size" not in config.augment
