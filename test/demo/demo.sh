#!/usr/bin/env bash
# test/demo/demo.sh: the ublksnap demo. Needs root and a kernel with ublk_drv.
set -euo pipefail
say() { printf '\n==> %s\n' "$*"; }
say "kernel $(uname -r); ublk control device:"
ls -l /dev/ublk-control
