#!/usr/bin/env bash
# Build the CPU image with podman where no registry can be reached (how it was built on the development
# machine, which has neither a Docker engine nor registry access):
#   1. a Debian bookworm root filesystem from debootstrap (Debian's default mirror), with python3 and venv,
#      imported as the base image instead of python:3.11-slim;
#   2. torch's CPU wheel from a local file (TORCH_WHEEL) and its dependencies, served to the build as a
#      local package index (instead of PyTorch's CPU index);
#   3. `podman build --isolation chroot` (no OCI runtime, no cgroups needed), in Docker format so the
#      HEALTHCHECK is kept. The build still installs the rest from the package index pip is set up for.
# Usage, from the source checkout, as root:
#   TORCH_WHEEL=/path/to/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl \
#     src/embedfleet/deploy/docker/podman-build-local.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/../../../.."
work="${1:-/tmp/embedfleet-image}"
: "${TORCH_WHEEL:?set TORCH_WHEEL to a local torch 2.13.0 CPU wheel}"
mkdir -p "$work"

if [ ! -x "$work/rootfs/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$work/rootfs"
fi
tar -C "$work/rootfs" -c . | podman import - localhost/embedfleet-base:bookworm

# A PEP 503 index on disk: one folder per project, each with an index.html (pip reads file:// indexes so).
rm -rf "$work/wheels" "$work/index"
python3 -m pip download -q "$TORCH_WHEEL" -d "$work/wheels"
python3 - "$work/wheels" "$work/index" <<'EOF'
import re, shutil, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in wheels.glob("*.whl"):
    folder = index / re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(wheel, folder / wheel.name)
for folder in index.iterdir():
    links = "".join(f'<a href="{w.name}">{w.name}</a>\n' for w in sorted(folder.glob("*.whl")))
    (folder / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
EOF

podman build --format docker --isolation chroot \
  --volume "$work/index:/torch-index:ro" \
  --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
  --build-arg PYTHON_IMAGE=localhost/embedfleet-base:bookworm \
  --build-arg TORCH_INDEX_URL=file:///torch-index \
  -f src/embedfleet/deploy/docker/Dockerfile.cpu -t localhost/embedfleet:cpu .
podman image ls localhost/embedfleet:cpu
