#!/usr/bin/env bash
# Build (once) an aarch64 Python sysroot that runs graphc's ARM artifacts under qemu-user:
# Debian bookworm arm64 packages for python3.11 and the C/C++ runtime, unpacked with dpkg -x,
# plus the aarch64 wheels of apache-tvm, apache-tvm-ffi and numpy (no torch, no graphc: the
# artifact's run.py needs only tvm + numpy, like a real board).
#
#   tools/arm_sysroot.sh            build into $GRAPHC_ARM_SYSROOT (default
#                                   ~/.cache/graphc/arm64-sysroot); a no-op when up to date
#   qemu-aarch64 -L "$SYSROOT" "$SYSROOT/usr/bin/python3.11" model.graphc.d/run.py ...
#                                   (with PYTHONPATH="$SYSROOT/site-packages")
#
# Needs root (or sudo) for `dpkg --add-architecture arm64` + apt-get update (a host setting: it
# only adds arm64 package lists), network for apt and PyPI, and a host pip. Host tools for the
# ARM target itself: apt-get install gcc-aarch64-linux-gnu qemu-user.
set -euo pipefail

SYSROOT="${GRAPHC_ARM_SYSROOT:-$HOME/.cache/graphc/arm64-sysroot}"
PIP="${PIP:-python3 -m pip}"

# python3.11's Depends (apt-cache depends), plus libstdc++6 and libgcc-s1 for TVM's runtime
# library; numpy's wheel carries its own BLAS and libgfortran.
DEBS=(libc6 libgcc-s1 libstdc++6 zlib1g libffi8 libssl3 libexpat1 libbz2-1.0 liblzma5
      libuuid1 libcrypt1 libncursesw6 libtinfo6 libreadline8 libsqlite3-0 libdb5.3 libnsl2
      libtirpc3 python3.11-minimal libpython3.11-minimal libpython3.11-stdlib)
# The versions graphc's pyproject pins on the build machine: the artifact's lib.so was linked
# against this TVM runtime ABI.
WHEELS=("apache-tvm==0.27.*" "apache-tvm-ffi==0.1.14.post0" "numpy")

stamp="$SYSROOT/.graphc-sysroot"
want="debs=${DEBS[*]} wheels=${WHEELS[*]} v2"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "arm64 sysroot up to date: $SYSROOT"
    exit 0
fi

sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    $sudo dpkg --add-architecture arm64
fi
$sudo apt-get update -q

rm -rf "$SYSROOT.partial"
mkdir -p "$SYSROOT.partial/debs"
(cd "$SYSROOT.partial/debs" && apt-get download -q "${DEBS[@]/%/:arm64}")
for deb in "$SYSROOT.partial"/debs/*.deb; do
    dpkg -x "$deb" "$SYSROOT.partial"
done
rm -rf "$SYSROOT.partial/debs" "$SYSROOT.partial/usr/share/doc" "$SYSROOT.partial/usr/share/man"

$PIP install -q --target "$SYSROOT.partial/site-packages" --only-binary=:all: \
    --platform manylinux_2_28_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    "${WHEELS[@]}"
# The compiler library (LLVM, ~240 MB) is never loaded on the board: run.py sets
# TVM_USE_RUNTIME_LIB=1. Dropping it keeps the cache small.
rm -f "$SYSROOT.partial"/site-packages/tvm/lib/libtvm_compiler.so
rm -rf "$SYSROOT.partial"/site-packages/tvm/3rdparty

# Byte-compile here (a host Python 3.11 writes the same .pyc files): the emulated Python would
# otherwise spend its first run compiling the stdlib, numpy and tvm.
if python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python3 -m compileall -q -j0 "$SYSROOT.partial/usr/lib/python3.11" \
        "$SYSROOT.partial/site-packages" >/dev/null || true
fi

echo "$want" > "$SYSROOT.partial/.graphc-sysroot"
rm -rf "$SYSROOT"
mv "$SYSROOT.partial" "$SYSROOT"
echo "arm64 sysroot built: $SYSROOT ($(du -sh "$SYSROOT" | cut -f1))"
