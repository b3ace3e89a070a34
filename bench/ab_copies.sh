#!/usr/bin/env bash
# Copies of lightning_rl at other commits, for A/B runs of bench_vs_trl.py in one device call (run here, not on the
# device: the device's copy of the tree has no git history). Each LABEL=COMMIT becomes bench/ab/LABEL/lightning_rl
# (bench/ab/ is git-ignored); carry bench/ab with the bench call and name each copy in an extra's PYTHONPATH:
#   bash bench/ab_copies.sh old=a831181 mid=005887c
#   STEPS=10 bash bench/gpu_visit.sh bench smollm2-lora ours 'again={}' 'old={"env":{"PYTHONPATH":"bench/ab/old"}}'
# The trainer, the engine process and its front end all import the copy (they inherit the extra's environment).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ $# -gt 0 ] || { echo "usage: bash bench/ab_copies.sh LABEL=COMMIT ..." >&2; exit 2; }
for spec in "$@"; do
  label=${spec%%=*} commit=${spec#*=}
  [ -n "$label" ] && [ "$label" != "$spec" ] || { echo "not LABEL=COMMIT: $spec" >&2; exit 2; }
  sha=$(git rev-parse --verify "$commit^{commit}")
  dest=bench/ab/$label
  rm -rf "$dest"; mkdir -p "$dest"
  git archive "$sha" lightning_rl | tar -x -C "$dest"
  echo "$dest/lightning_rl: $(git log -1 --format='%h %ad %s' --date=short "$sha" | cut -c1-100)"
done
du -sh bench/ab
