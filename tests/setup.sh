#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (root): system packages
# (ffmpeg, shellcheck, Slurm + munge, iproute2) and the package with its test extras, pinned to
# the local CPU torch wheel.
set -euo pipefail
need=()
for pair in ffmpeg:ffmpeg shellcheck:shellcheck slurmctld:slurm-wlm munged:munge ip:iproute2; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q
  apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
fi
python -m pip install -q torch==2.13.0 -e ".[test]"
