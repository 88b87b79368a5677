"""Every registered pass refuses out-of-range options with an error naming pass and option."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import graphc
from graphc.errors import GraphcError
from tests.badinput.pass_options import BAD_OPTIONS, PREPARE


class Net(nn.Module):
    """conv + batchnorm + two linears: every compression pass has a layer to work on."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc, self.fc2 = nn.Linear(16 * 8 * 8, 64), nn.Linear(64, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))))


@pytest.fixture(scope="module")
def graphs():
    torch.manual_seed(0)
    g = graphc.trace(Net().eval(), (torch.randn(2, 3, 8, 8),))
    cache = {}

    def graph_for(name: str):
        if name not in cache:
            cache[name] = graphc.run_pipeline(g, PREPARE[name])[0] if name in PREPARE else g
        return cache[name]

    return graph_for


CASES = [(name, options, regex) for name, cases in sorted(BAD_OPTIONS.items())
         for options, regex in cases]


def test_every_registered_pass_has_bad_options():
    # a new pass must come with its bad options here, so the corpus stays complete
    missing = sorted(set(graphc.PASSES) - set(BAD_OPTIONS))
    assert not missing, f"add bad options for {missing} to tests/badinput/pass_options.py"
    assert all(BAD_OPTIONS[name] for name in graphc.PASSES)


@pytest.mark.parametrize("name, options, regex", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for n, o, _ in CASES])
def test_bad_option_is_refused_by_name(graphs, name, options, regex):
    if name not in graphc.PASSES:
        pytest.skip(f"pass '{name}' is not registered in this checkout")
    with pytest.raises(GraphcError) as info:
        graphc.run_pipeline(graphs(name), [(name, options)])
    assert re.search(regex, str(info.value)), str(info.value)


@pytest.mark.parametrize("name", ["quantize", "prune"])
def test_bad_option_in_a_pipeline_string(graphs, name):
    # the same check through the text form users type on the command line
    options, regex = BAD_OPTIONS[name][0]
    text = f"{name}({', '.join(f'{k}={v}' for k, v in options.items())})"
    with pytest.raises(GraphcError) as info:
        graphc.run_pipeline(graphs(name), text)
    assert re.search(regex, str(info.value)), str(info.value)
