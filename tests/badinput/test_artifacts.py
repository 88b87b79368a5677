"""Damaged artifacts: graphc.load (and the board runner) must refuse each, naming the member,
before anything of the file is extracted or loaded. The checksum detects corruption and
accidental edits; an attacker can recompute it (test_resealed_library_runs shows that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import graphc
from graphc.compiled import _sealed_header
from graphc.errors import ArtifactError

LIB = "runner/lib.so"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU())
    path = tmp_path_factory.mktemp("artifact") / "good.graphc"
    graphc.compile(model, (torch.randn(2, 8),), target="cpu").save(path)
    return path


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def _write(path: Path, members: dict[str, bytes] | list[tuple[str, bytes]],
           reseal: bool = False) -> Path:
    """A zip of `members` (a list may repeat a name); reseal: recompute the checksums, as
    an attacker would."""
    items = list(members.items()) if isinstance(members, dict) else members
    if reseal:
        header = json.loads(dict(items)["meta.json"])
        header.pop("integrity")
        rest = {n: d for n, d in items if n != "meta.json"}
        items = [("meta.json", _sealed_header(header, rest)), *rest.items()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
    return path


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:]


def _flip_in_file(good: Path, dest: Path, member: str) -> Path:
    """One byte flipped inside `member`'s stored (compressed) bytes, the zip left as is."""
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo(member)
    raw = good.read_bytes()
    name_len, extra_len = (int.from_bytes(raw[info.header_offset + k:info.header_offset + k + 2],
                                          "little") for k in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    dest.write_bytes(_flip(raw, start + info.compress_size // 2))
    return dest


def _edited_meta(members: dict[str, bytes]) -> dict[str, bytes]:
    # an input shape edited by hand: loaded, it would accept inputs lib.so was not built for
    header = json.loads(members["meta.json"])
    header["input_specs"][0]["shape"] = [4, 8]
    return {**members, "meta.json": json.dumps(header, indent=1).encode()}


CASES = {
    # name: (make the bad file from (good, tmp), message regex)
    "truncated": (lambda g, t: _bytes(t, g.read_bytes()[: g.stat().st_size // 2]),
                  r"is not a graphc artifact or is corrupt"),
    "not-a-zip": (lambda g, t: _bytes(t, b"graphc? no.\n" * 100),
                  r"is not a graphc artifact or is corrupt \(BadZipFile"),
    "empty": (lambda g, t: _bytes(t, b""), r"is not a graphc artifact or is corrupt"),
    "zip-without-meta": (lambda g, t: _write(t, {"hello.txt": b"hi"}), r"no meta\.json"),
    "lib-byte-flipped": (lambda g, t: _flip_in_file(g, t, LIB),
                         r"member 'runner/lib\.so' is corrupt"),
    "meta-byte-flipped": (lambda g, t: _flip_in_file(g, t, "meta.json"),
                          r"member 'meta\.json' is corrupt"),
    "lib-edited": (lambda g, t: _write(t, {**_members(g), LIB: _flip(_members(g)[LIB], 4000)}),
                   r"member 'runner/lib\.so' fails its SHA-256 check"),
    "meta-edited": (lambda g, t: _write(t, _edited_meta(_members(g))),
                    r"member 'meta\.json' fails its SHA-256 check"),
    "member-removed": (lambda g, t: _write(t, {n: d for n, d in _members(g).items()
                                               if n != "runner/runner.json"}),
                       r"\['runner/runner\.json'\] are missing"),
    "member-added": (lambda g, t: _write(t, {**_members(g), "runner/extra.so": b"\x7fELF"}),
                     r"\['runner/extra\.so'\] are not in the artifact's integrity record"),
    "path-traversal": (lambda g, t: _write(t, {**_members(g), "runner/../../x": b"boo"}),
                       r"member 'runner/\.\./\.\./x' has an unsafe path"),
    "absolute-path": (lambda g, t: _write(t, {**_members(g), "/tmp/x": b"boo"}),
                      r"member '/tmp/x' has an unsafe path"),
    "member-twice": (lambda g, t: _write(t, [*_members(g).items(), (LIB, b"\x7fELF")]),
                     r"\['runner/lib\.so'\] appear twice"),
    "no-integrity": (lambda g, t: _write(t, {**_members(g), "meta.json": json.dumps(
        {k: v for k, v in json.loads(_members(g)["meta.json"]).items()
         if k != "integrity"}).encode()}), r"meta\.json has no integrity record"),
    "old-version": (lambda g, t: _write(t, {**_members(g), "meta.json": json.dumps(
        {**json.loads(_members(g)["meta.json"]), "version": 1}).encode()}),
        r"artifact version 1; this graphc reads version 2: recompile"),
}


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_is_refused(good, tmp_path, case):
    make, regex = CASES[case]
    bad = make(good, tmp_path / f"{case}.graphc")
    with pytest.raises(ArtifactError, match=regex):
        graphc.load(bad)
    assert not (tmp_path.parent / "x").exists()  # nothing escaped the temporary folder


def test_good_artifact_and_resealed_edits_load(good, tmp_path):
    x = torch.randn(2, 8)
    assert graphc.load(good)(x).shape == (2, 4)
    # the same members re-zipped (other dates, order of compression) still verify
    assert graphc.load(_write(tmp_path / "rezipped.graphc", _members(good)))(x).shape == (2, 4)


# ---- the check runs before any code of the file does ------------------------------------
MARKER_SO = r"""
#include <stdio.h>
__attribute__((constructor)) static void graphc_test_marker(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("lib.so code ran", f); fclose(f); }
}
"""


@pytest.fixture
def marker_lib(tmp_path):
    """A shared library whose constructor (run by dlopen) writes a marker file."""
    marker = tmp_path / "marker.txt"
    src = tmp_path / "marker.c"
    src.write_text(MARKER_SO)
    lib = tmp_path / "marker.so"
    cc = subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o",
                         str(lib)], capture_output=True, text=True, check=False)
    if cc.returncode != 0:
        pytest.skip(f"no C compiler for the marker library: {cc.stderr[-300:]}")
    return lib.read_bytes(), marker


def test_tampered_library_is_refused_before_dlopen(good, tmp_path, marker_lib):
    code, marker = marker_lib
    bad = _write(tmp_path / "tampered.graphc", {**_members(good), LIB: code})
    with pytest.raises(ArtifactError, match=r"member 'runner/lib\.so' fails its SHA-256"):
        graphc.load(bad)
    assert not marker.exists()
    # the board runner (the artifact's own __main__.py, tvm + numpy only) refuses it too
    proc = subprocess.run([sys.executable, str(bad)], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode != 0
    assert "member 'runner/lib.so' fails its SHA-256 check" in proc.stderr, proc.stderr[-800:]
    assert not marker.exists()


def test_resealed_library_runs(good, tmp_path, marker_lib):
    # The control that shows the test above can fail: with the sums recomputed (what an
    # attacker does), dlopen runs the library's code. The checksum is no defence against
    # malice: an artifact is code, load only trusted ones (docs/debugging.md).
    code, marker = marker_lib
    bad = _write(tmp_path / "resealed.graphc", {**_members(good), LIB: code}, reseal=True)
    with pytest.raises(ArtifactError, match=r"cannot load the compiled library"):
        graphc.load(bad)
    assert marker.read_text() == "lib.so code ran"


def test_board_runner_runs_the_good_artifact(good, tmp_path):
    proc = subprocess.run([sys.executable, str(good)], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-800:]
    assert "out0: float32[2, 4]" in proc.stdout


def test_members_take_the_smaller_compression_and_main_stays_deflated(good, tmp_path):
    """compiled._packed: each member is deflated or LZMA-compressed, whichever is smaller;
    __main__.py is always deflated (zipimport, which runs `python3 good.graphc` in the test
    above, reads no LZMA member)."""
    with zipfile.ZipFile(good) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        members = {n: zf.read(n) for n in infos}
    assert infos["__main__.py"].compress_type == zipfile.ZIP_DEFLATED
    assert infos[LIB].compress_type == zipfile.ZIP_LZMA  # machine code: LZMA wins
    for name, data in members.items():
        for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA):
            with zipfile.ZipFile(tmp_path / "one.zip", "w", method) as zf:
                zf.writestr(name, data)
            with zipfile.ZipFile(tmp_path / "one.zip") as zf:
                other = zf.getinfo(name).compress_size
            if name != "__main__.py":
                assert infos[name].compress_size <= other, (name, method)


def test_lzma_members_take_the_literal_model_that_suits_their_bytes(tmp_path):
    """compiled._packed tries LZMA_PROPS: float32 weights want the byte's position in its
    word (lp=2), packed 4-bit indices of a skewed distribution no context (lc=0). The
    chosen properties travel in the member's header: plain zipfile reads it back."""
    from graphc.compiled import LZMA_PROPS, _lzma_member, _packed, _Ready
    from graphc.ops_codebook import pack
    from graphc.passes.share_entropy import ecsq_rows, entropy_bits
    from graphc.passes.share_kmeans import kmeans_1d

    gen = torch.Generator().manual_seed(0)
    floats = (torch.randn(40000, generator=gen) * 0.05).numpy().tobytes()
    w = torch.randn(1, 80000, generator=gen)  # 4-bit codes of a bell-shaped weight at 2.7 bits
    c, idx = kmeans_1d(w, 16)
    _, idx = ecsq_rows(w, c[None], idx, 0.04, 1.0)
    packed = pack(idx.reshape(-1), 4).numpy().tobytes()
    sizes = [len(_lzma_member(packed, p)) for p in LZMA_PROPS]
    print(f"packed indices ({entropy_bits(idx, 16):.2f} bits each), LZMA with each of "
          f"LZMA_PROPS: {sizes}")
    assert sizes.index(min(sizes)) == 1 and sizes[1] < 0.99 * sizes[0]  # measured 0.984
    method, payload = _packed("runner/lib.so", floats)
    props = LZMA_PROPS[2]
    assert method == zipfile.ZIP_LZMA and payload == _lzma_member(floats, props)
    with zipfile.ZipFile(tmp_path / "m.zip", "w") as zf:
        info = zipfile.ZipInfo("runner/lib.so")
        info.compress_type = method
        with zf.open(info, "w") as out:
            out._compressor = _Ready(payload)
            out.write(floats)
    with zipfile.ZipFile(tmp_path / "m.zip") as zf:
        assert zf.read("runner/lib.so") == floats
        ours = zf.getinfo("runner/lib.so").compress_size
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_LZMA) as zf:
        zf.writestr("runner/lib.so", floats)
    with zipfile.ZipFile(tmp_path / "d.zip") as zf:
        default = zf.getinfo("runner/lib.so").compress_size
    print(f"float32 weights: {ours} bytes with {props}, {default} with zipfile's LZMA")
    assert ours < 0.95 * default
