#!/usr/bin/env bash
# On the development machine: the source trees scripts/ab_trees.sh compares, under base/ (which
# git does not ignore, so they travel to the CUDA machine with the checkout; remove them before
# committing).
#
#   bash scripts/make_trees.sh pre=56e7a0a half=HEAD+sm90-fwd-half-first-block
#
# NAME=REV: git archive of REV. NAME=REV+DIR[+DIR...]: REV with benchmarks/pending/DIR's patch
# series applied by git am -3, one series after the other (as this checkout holds them). Each
# tree's COMMIT file names what it is (REV's short hash, "+DIR" per series), which the
# benchmarks' results carry.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { sed -n '2,12p' "$0"; exit 2; }
for spec in "$@"; do
  name=${spec%%=*}; what=${spec#*=}
  rev=${what%%+*}; series=""
  [ "$rev" != "$what" ] && series=${what#*+}
  for dir in ${series//+/ }; do
    [ -d "benchmarks/pending/$dir" ] || { echo "no benchmarks/pending/$dir"; exit 1; }
  done
  short=$(git rev-parse --short "$rev")
  rm -rf "base/$name"; mkdir -p "base/$name"
  if [ -z "$series" ]; then
    git archive "$short" | tar -x -C "base/$name"
    echo "$short" > "base/$name/COMMIT"
  else
    work=$(mktemp -d)
    # A series that does not apply stops the script: its worktree goes with it.
    trap 'git worktree remove --force "$work" 2>/dev/null || true' EXIT
    git worktree add -q --detach "$work" "$short"
    for dir in ${series//+/ }; do
      git -C "$work" -c user.name=trees -c user.email=trees@localhost am -3 -q "$PWD/benchmarks/pending/$dir"/*.patch
    done
    git -C "$work" archive HEAD | tar -x -C "base/$name"
    git worktree remove --force "$work"
    echo "$short+$series" > "base/$name/COMMIT"
  fi
  echo "base/$name: $(cat "base/$name/COMMIT")"
done
