import pytest
import torch
from torch import nn

from core.report.receptive_field import COLUMNS, format_rf_table, receptive_field_table


def conv(c_in=3, c_out=3, k=3, stride=1, dilation=1, padding=None):
    padding = dilation * (k - 1) // 2 if padding is None else padding
    return nn.Conv2d(c_in, c_out, k, stride, padding, dilation)


def routs(model, input_size=32):
    return [row["rout"] for row in receptive_field_table(model, input_size)]


def test_three_3x3_convs_see_7():
    assert routs(nn.Sequential(conv(), nn.ReLU(), conv(), nn.BatchNorm2d(3), conv())) == [3, 5, 7]


def test_dilated_3x3_sees_5():
    assert routs(nn.Sequential(conv(dilation=2))) == [5]


def test_stride_multiplies_the_jump():
    rows = receptive_field_table(nn.Sequential(conv(stride=2), conv()))
    assert [(r["rin"], r["rout"]) for r in rows] == [(1, 3), (3, 7)]
    assert [(r["jin"], r["jout"]) for r in rows] == [(1, 2), (2, 2)]
    assert [(r["nin"], r["nout"]) for r in rows] == [(32, 16), (16, 16)]


def test_pools_and_gap():
    model = nn.Sequential(conv(), nn.MaxPool2d(2), conv(), nn.AvgPool2d(2), conv(padding=0),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))
    rows = receptive_field_table(model)
    assert [r["rout"] for r in rows] == [3, 4, 8, 10, 18, 18 + 5 * 4]
    gap = rows[-1]
    assert (gap["nin"], gap["kernel"], gap["stride"], gap["nout"]) == (6, 6, 1, 1)


class TwoBranches(nn.Module):
    """Branches of RF 5 and 3 concatenated, a 1x1 conv, a residual 3x3 conv."""

    def __init__(self):
        super().__init__()
        self.wide, self.narrow = conv(dilation=2), conv()
        self.mix, self.res = conv(6, 3, k=1), conv()

    def forward(self, x):
        y = self.mix(torch.cat([self.narrow(x), torch.relu(self.wide(x))], dim=1))
        return y + self.res(y)


def test_concat_takes_the_widest_branch_and_add_joins():
    rows = receptive_field_table(TwoBranches())
    assert [(r["layer"], r["rin"], r["rout"]) for r in rows] == [
        ("narrow", 1, 3), ("wide", 1, 5), ("mix", 5, 5), ("res", 5, 7)]
    assert [r["in_ch"] for r in rows] == [3, 3, 6, 3]


class MismatchedJumps(nn.Module):
    def __init__(self):
        super().__init__()
        self.strided, self.big = conv(stride=2), conv(k=17, padding=0)

    def forward(self, x):
        return torch.cat([self.strided(x), self.big(x)], dim=1)


def test_joining_different_jumps_is_an_error():
    with pytest.raises(ValueError, match="jumps"):
        receptive_field_table(MismatchedJumps())


def test_training_modes_are_restored():
    model = nn.Sequential(conv(), nn.BatchNorm2d(3), nn.Dropout())
    model[2].eval()
    receptive_field_table(model)
    assert [m.training for m in model] == [True, True, False]
    assert model[1].num_batches_tracked == 0


def test_untraceable_input_is_an_error():
    class Detached(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv()

        def forward(self, x):
            return self.conv(torch.from_numpy(x.numpy().copy()))

    with pytest.raises(ValueError, match="trace back"):
        receptive_field_table(Detached())


def test_table_columns_and_final_line():
    model = nn.Sequential(conv(dilation=2), conv(stride=2), conv())
    text = format_rf_table(receptive_field_table(model))
    lines = text.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(COLUMNS)
    assert list(COLUMNS) == ["layer", "nin", "in_ch", "out_ch", "padding", "kernel", "stride",
                             "dilation", "nout", "jin", "jout", "rin", "rout"]
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    assert first == ["0", "32", "3", "3", "2", "3", "1", "2", "32", "1", "1", "1", "5"]
    assert len(lines) == 2 + 3 + 2
    assert lines[-1] == "Receptive field: 11"
