"""IR dumps: numbered, deterministic files per stage, and a picture a person can open."""

import xml.etree.ElementTree as ET

import graphc
from graphc.dump import Dumper
from graphc.pipeline import run_pipeline
from tests.models.zoo import build


def _dump(tmp):
    m, x = build("conv_bn_residual")
    run_pipeline(graphc.trace(m, x), "fold-batchnorm, dead-code-elimination", dump=Dumper(tmp))
    return {p.name: p.read_text() for p in sorted(tmp.iterdir())}


def test_one_numbered_file_per_stage(tmp_path):
    files = _dump(tmp_path)
    assert sorted(files) == ["00-input.svg", "00-input.txt", "01-fold-batchnorm.svg",
                             "01-fold-batchnorm.txt", "02-dead-code-elimination.svg",
                             "02-dead-code-elimination.txt"]
    assert "_native_batch_norm_legit_no_training" in files["00-input.txt"]
    assert "_native_batch_norm_legit_no_training" not in files["01-fold-batchnorm.txt"]


def test_dumps_are_deterministic(tmp_path):
    assert _dump(tmp_path / "a") == _dump(tmp_path / "b")


def test_svg_is_valid_and_shows_every_node(tmp_path):
    files = _dump(tmp_path)
    root = ET.fromstring(files["01-fold-batchnorm.svg"])
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text for t in root.iter(f"{ns}text")]
    m, x = build("conv_bn_residual")
    folded = graphc.PASSES["fold-batchnorm"].fn(graphc.trace(m, x))
    boxes = [n for n in folded.nodes if n.op != "get_attr"]  # weights are listed in boxes
    assert len(list(root.iter(f"{ns}rect"))) == len(boxes)
    assert "  convolution_folded_weight: f32[8, 3, 3, 3]" in texts
    assert "aten.convolution" in texts and "output" in texts
