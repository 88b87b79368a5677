"""CompiledModel: what graphc.compile returns, whatever backend built it.

A CompiledModel is a thin shell around a backend *runner* (see `Runner`). The shell owns
everything that is the same for every backend: input checking, torch/numpy conversion,
benchmarking, the pass report, and the one-file artifact format:

    model.graphc (zip)
      meta.json      format marker, version, specs, target, backend, free-form meta, and
                     "integrity": the SHA-256 of every other member and of meta.json itself
      runner/...     files the backend's runner wrote (e.g. the TVM shared library)
      __main__.py    when the runner has main_script(): `python3 model.graphc` runs the model
                     without graphc (TVM: backends/tvm/board_runner.py, for devices)

Integrity: load() checks every member against its SHA-256 (and that no member was added or
removed) before it extracts anything or hands a file to the backend (dlopen). That detects
corruption and accidental edits, not malice: whoever can edit the file can recompute the
sums. An artifact is code, like a pickle or a .so: load only artifacts you trust.

Reproducible: the same model, passes and target give a byte-identical file. Zip entries get
a fixed date and mode, and wall-clock timings (pass and build seconds) are left out of the
saved meta (they stay in the in-memory CompiledModel.meta).

Compression: each member is deflated or LZMA-compressed, whichever is smaller (LZMA: ~12%
smaller on machine code; digits CNN with 4-bit shared weights: lib.so 40,720 -> 35,757
bytes). LZMA is tried with three literal models (LZMA_PROPS) and the smallest kept: its
default, where a byte's coding depends on the 3 high bits of the byte before (suits machine
code); none (lc=0, pb=0), for packed codebook indices, independent draws from one skewed
distribution that 8 contexts only split; and the byte's position in a 4-byte word (lp=2),
for float32 weights, whose sign-and-exponent bytes recur every 4 bytes. Digits CNN: fp32
lib.so 151,867 -> 139,600 bytes (lp=2: 8%); 4-bit shared 30,922 -> 30,417 (lc=0). Any
reader decodes all three: the properties are in the member's LZMA header. LZMA is tried on
members up to LZMA_MAX_BYTES only: it compresses ~2 MB/s, three tries of a 44 MB ResNet-18
lib.so would add over a minute to save(); larger members are deflated (a single lp=2 try
would likely gain them the same 8%: not measured, left out). Readers need Python's lzma
module (standard, also in the aarch64 sysroot of tools/arm_sysroot.sh).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import lzma
import os
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from graphc.errors import ArtifactError, GraphcError, InputError
from graphc.spec import TensorSpec, check_inputs

FORMAT = "graphc-compiled"
FORMAT_VERSION = 2  # 2: meta.json carries "integrity" (SHA-256 of every member)
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: entries carry no build time
LZMA_MAX_BYTES = 8 << 20  # larger members are deflated without trying LZMA (see above)
DEFLATE_ONLY = ("__main__.py",)  # members zipimport must read
LZMA_PROPS = ({"lc": 3, "lp": 0, "pb": 2}, {"lc": 0, "lp": 0, "pb": 0},  # see above
              {"lc": 1, "lp": 2, "pb": 0})
# Wall-clock timings in meta: they differ on every compile, so the saved file leaves them out.
TIMING_KEYS = ("seconds", "phase_seconds", "search_seconds")

# How to rebuild a runner from its saved files, per backend ("module:function", imported
# lazily so that loading a TVM artifact does not need the torch backend and vice versa).
RUNNER_LOADERS = {
    "tvm": "graphc.backends.tvm.runtime:load_runner",
    "torch": "graphc.backends.torch_backend:load_runner",
}


class Runner(Protocol):
    """What a backend provides. Conversion is split from running so benchmarks time only run()."""

    def convert(self, inputs: list[torch.Tensor | np.ndarray]) -> Any:
        """Backend-native inputs (done once, outside timed regions)."""

    def run(self, native_inputs: Any) -> Any:
        """Run the model; returns backend-native outputs."""

    def outputs(self, native_outputs: Any) -> list[torch.Tensor | np.ndarray]:
        """Native outputs as a flat list of numpy arrays or torch tensors."""

    def save(self, directory: Path) -> None:
        """Write the files load_runner(directory) needs; may raise GraphcError if unsupported."""


class CompiledModel:
    """A compiled model: call it like the original model with torch tensors or numpy arrays."""

    def __init__(self, runner: Runner, *, input_specs: list[TensorSpec],
                 output_specs: list[TensorSpec], single_output: bool, target: str,
                 backend: str, meta: dict | None = None):
        self.runner = runner
        self.input_specs = list(input_specs)
        self.output_specs = list(output_specs)
        self.single_output = single_output
        self.target = target
        self.backend = backend
        self.meta = dict(meta or {})

    def __repr__(self) -> str:
        ins = ", ".join(map(str, self.input_specs))
        outs = ", ".join(map(str, self.output_specs))
        return f"CompiledModel(backend={self.backend}, target={self.target}, ({ins}) -> ({outs}))"

    def __call__(self, *inputs):
        _check_kinds(self.input_specs, inputs)
        check_inputs(self.input_specs, inputs, where=f"{self.backend} compiled model")
        outputs = self.runner.outputs(self.runner.run(self.runner.convert(list(inputs))))
        # numpy in -> numpy out; anything with a torch tensor in -> torch out.
        as_numpy = all(isinstance(x, np.ndarray) for x in inputs) and len(inputs) > 0
        outputs = tuple(_to_numpy(o) if as_numpy else _to_torch(o) for o in outputs)
        return outputs[0] if self.single_output else outputs

    @property
    def num_threads(self) -> int | None:
        """Threads the compiled kernels run on; None: the backend's default (TVM: all cores)."""
        return getattr(self.runner, "num_threads", None)

    @num_threads.setter
    def num_threads(self, n: int | None) -> None:
        if not hasattr(type(self.runner), "num_threads"):
            raise GraphcError(f"the {self.backend} backend has no thread-count setting")
        self.runner.num_threads = n

    def benchmark(self, repeat: int = 50, warmup: int = 5, number: int = 1,
                  remote: str | None = None) -> dict:
        """Time the runner on example inputs; stats are milliseconds per call. remote:
        "host:port" of a TVM RPC server (or "host:port/key" of a tracker) to time the model
        on that device instead (TVM backend; docs/targets.md, section remote)."""
        inputs = [spec.example(seed=i) for i, spec in enumerate(self.input_specs)]
        if remote is not None:
            measure = getattr(self.runner, "benchmark_remote", None)
            if measure is None:
                raise GraphcError(f"benchmark(remote=...): the {self.backend} backend cannot "
                                  "run on a remote device; compile for a TVM target")
            return measure([_to_numpy(x) for x in inputs], remote, repeat=repeat,
                           warmup=warmup, number=number)
        native = self.runner.convert(inputs)  # converted once, outside the timed region
        for _ in range(warmup):
            self.runner.run(native)
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                self.runner.run(native)
            samples.append((time.perf_counter() - start) * 1e3 / number)
        ms = np.asarray(samples)
        return {"median": float(np.median(ms)), "mean": float(ms.mean()), "min": float(ms.min()),
                "max": float(ms.max()), "p90": float(np.percentile(ms, 90)),
                "std": float(ms.std()), "repeat": repeat, "number": number}

    def report(self) -> str:
        """The per-pass report rows in meta["passes"] as a printable table."""
        from graphc.report import passes_table

        # a loaded artifact has no timings (save leaves them out): shown as nan
        rows = [{"seconds": float("nan"), **r} for r in self.meta.get("passes") or []]
        return passes_table(rows, title=repr(self))

    def save(self, path: str | os.PathLike) -> None:
        """Write one file (a zip) that load_compiled(path) reads back, in any process."""
        path = Path(path)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "backend": self.backend,
                  "target": self.target, "single_output": self.single_output,
                  "input_specs": [s.to_json() for s in self.input_specs],
                  "output_specs": [s.to_json() for s in self.output_specs],
                  "meta": _without_timings(self.meta)}
        with tempfile.TemporaryDirectory() as tmp:
            self.runner.save(Path(tmp))
            members = {}
            main_script = getattr(self.runner, "main_script", None)  # optional
            if main_script is not None:
                members["__main__.py"] = main_script().encode()
            for f in sorted(Path(tmp).rglob("*")):
                if f.is_file():
                    members["runner/" + f.relative_to(tmp).as_posix()] = f.read_bytes()
        try:
            header_bytes = _sealed_header(header, members)
        except TypeError as e:
            raise GraphcError(f"save: CompiledModel.meta must be JSON-serializable: {e}") from e
        # Write next to the destination, then rename: a failed save leaves no half file.
        partial = path.with_name(path.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in {"meta.json": header_bytes, **members}.items():
                info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
                method, payload = _packed(name, data)
                info.compress_type, info.external_attr = method, 0o644 << 16
                with zf.open(info, "w") as out:
                    # zipfile would compress again, and its LZMA writer takes no options:
                    # hand it the bytes _packed chose (it still sums and sizes `data`)
                    out._compressor = _Ready(payload)
                    out.write(data)
        os.replace(partial, path)


def load_compiled(path: str | os.PathLike) -> CompiledModel:
    """Read a file written by CompiledModel.save (graphc.load). Every member is checked
    against its SHA-256 before anything is extracted or loaded (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"graphc.load: no such file: {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            header = _read_header(zf, path)
            members = _verified_members(zf, header, path)
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ArtifactError(f"graphc.load: {path} is not a graphc artifact or is corrupt "
                            f"({type(e).__name__}: {e})") from e
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in members.items():
            if name.startswith("runner/"):
                dest = Path(tmp) / name.removeprefix("runner/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
        runner = _runner_loader(header["backend"], path)(Path(tmp))
    return CompiledModel(
        runner, input_specs=[TensorSpec.from_json(d) for d in header["input_specs"]],
        output_specs=[TensorSpec.from_json(d) for d in header["output_specs"]],
        single_output=header["single_output"], target=header["target"],
        backend=header["backend"], meta=header.get("meta", {}))


def _check_kinds(specs: list[TensorSpec], inputs: tuple) -> None:
    # check_inputs reads .shape/.dtype; give a clear error before it meets a list or a float.
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor | np.ndarray):
            name = specs[i].name if i < len(specs) else f"#{i}"
            raise InputError(f"input '{name}' must be a torch.Tensor or numpy.ndarray, "
                             f"got {type(x).__name__}")


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _to_torch(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    # reshape: np.ascontiguousarray makes a 0-d array 1-d (x.min() came back with shape [1])
    return torch.from_numpy(np.ascontiguousarray(x).reshape(np.shape(x)))


def _read_header(zf: zipfile.ZipFile, path: Path) -> dict:
    if "meta.json" not in zf.namelist():
        raise ArtifactError(f"graphc.load: {path} is a zip file but not a graphc artifact "
                            "(no meta.json)")
    try:
        header = json.loads(_read_member(zf, "meta.json", path))
    except (ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"graphc.load: {path}: meta.json is corrupt ({e})") from e
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ArtifactError(f"graphc.load: {path} is not a graphc artifact (format marker missing)")
    if header.get("version") != FORMAT_VERSION:
        raise ArtifactError(f"graphc.load: {path} has artifact version {header.get('version')}; "
                            f"this graphc reads version {FORMAT_VERSION}: recompile the model")
    missing = {"backend", "target", "single_output", "input_specs", "output_specs"} - set(header)
    if missing:
        raise ArtifactError(f"graphc.load: {path}: meta.json lacks {sorted(missing)}")
    return header


def _packed(name: str, data: bytes) -> tuple[int, bytes]:
    """(zip method, the member's compressed bytes): the smallest of deflate (zlib level 6,
    zipfile's) and LZMA preset 6 with each of LZMA_PROPS (its zip header included)."""
    deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    best = (zipfile.ZIP_DEFLATED, deflate.compress(data) + deflate.flush())
    if name in DEFLATE_ONLY or len(data) > LZMA_MAX_BYTES:
        return best
    for props in LZMA_PROPS:
        packed = _lzma_member(data, props)
        if len(packed) < len(best[1]):
            best = (zipfile.ZIP_LZMA, packed)
    return best


def _lzma_member(data: bytes, props: dict) -> bytes:
    """A zip LZMA member, as zipfile.LZMACompressor writes it but with these properties:
    version 9.4, the properties' length, the encoded properties, the raw LZMA1 stream."""
    lzma1 = {"id": lzma.FILTER_LZMA1, "preset": 6, **props}
    encoded = lzma._encode_filter_properties(lzma1)
    return (struct.pack("<BBH", 9, 4, len(encoded)) + encoded
            + lzma.compress(data, format=lzma.FORMAT_RAW, filters=[lzma1]))


class _Ready:
    """A zipfile compressor that emits bytes compressed already (the whole member)."""

    def __init__(self, payload: bytes):
        self._payload = payload

    def compress(self, _data: bytes) -> bytes:
        out, self._payload = self._payload, b""
        return out

    def flush(self) -> bytes:
        return self.compress(b"")


def _read_member(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return zf.read(name)  # checks the zip's CRC-32 too: most corruption stops here
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError) as e:
        raise ArtifactError(f"graphc.load: {path}: member {name!r} is corrupt "
                            f"({type(e).__name__}: {e}); nothing was loaded") from e


def _without_timings(meta):
    if isinstance(meta, dict):
        return {k: _without_timings(v) for k, v in meta.items() if k not in TIMING_KEYS}
    if isinstance(meta, list | tuple):
        return [_without_timings(v) for v in meta]
    return meta


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(header: dict) -> bytes:
    """The bytes meta.json's own checksum covers: the header without that checksum."""
    integrity = {k: v for k, v in header.get("integrity", {}).items() if k != "meta.json"}
    return json.dumps({**header, "integrity": integrity}, sort_keys=True).encode()


def _sealed_header(header: dict, members: dict[str, bytes]) -> bytes:
    header = {**header, "integrity": {"algorithm": "sha256",
                                      "members": {n: _digest(d) for n, d in members.items()}}}
    header["integrity"]["meta.json"] = _digest(_canonical(header))
    # compact: indentation was ~80 bytes of a zipped small artifact (`python -m json.tool`
    # shows it indented)
    return json.dumps(header, separators=(",", ":")).encode()


def _verified_members(zf: zipfile.ZipFile, header: dict, path: Path) -> dict[str, bytes]:
    """Every member but meta.json, read and checked against the header's SHA-256 sums."""
    names = zf.namelist()
    for name in names:
        # Refuse names that would escape a folder they are extracted to ("runner/../../x").
        if ".." in Path(name).parts or name.startswith(("/", "\\")) or ":" in name:
            raise ArtifactError(f"graphc.load: {path}: member {name!r} has an unsafe path")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ArtifactError(f"graphc.load: {path}: member(s) {twice} appear twice")
    integrity = header.get("integrity")
    if not isinstance(integrity, dict) or not isinstance(integrity.get("members"), dict):
        raise ArtifactError(f"graphc.load: {path}: meta.json has no integrity record")
    if integrity.get("meta.json") != _digest(_canonical(header)):
        raise ArtifactError(f"graphc.load: {path}: member 'meta.json' fails its SHA-256 check "
                            "(the header was edited or is corrupt)")
    expected = integrity["members"]
    present = [n for n in names if n != "meta.json" and not n.endswith("/")]
    extra, missing = sorted(set(present) - set(expected)), sorted(set(expected) - set(present))
    if extra:
        raise ArtifactError(f"graphc.load: {path}: member(s) {extra} are not in the "
                            "artifact's integrity record (added after save)")
    members = {}
    for name in present:
        data = _read_member(zf, name, path)
        if _digest(data) != expected[name]:
            raise ArtifactError(f"graphc.load: {path}: member {name!r} fails its SHA-256 "
                                "check (corrupt or edited); nothing was loaded")
        members[name] = data
    if missing:
        raise ArtifactError(f"graphc.load: {path}: member(s) {missing} are missing")
    return members


def _runner_loader(backend: str, path: Path):
    if backend not in RUNNER_LOADERS:
        raise ArtifactError(f"graphc.load: {path} was written by unknown backend {backend!r} "
                            f"(known: {', '.join(RUNNER_LOADERS)})")
    module, func = RUNNER_LOADERS[backend].split(":")
    return getattr(importlib.import_module(module), func)
