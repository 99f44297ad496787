#!/usr/bin/env bash
# Fill .device/ with what the GPU machine lacks, for the device tool's `carry` (see docs/gpu.md):
#   .device/wheels/             Python 3.12 wheels from ../shared/gpu/wheels (the GPU machine has no registry)
#   .device/cifar10-jpg.tar.gz  the CIFAR-10 JPEGs (19 MB), checked against their published sha256
#   .device/commit.txt          the commit (and local changes) the run measures: the GPU copy has no .git
# .device/ is git-ignored (.gitignore; else this adds it to .git/info/exclude): only ignored paths named
# in `carry` travel, and the working tree plus carried paths must stay under 64 MiB.
#
# usage: scripts/prepare_device_carry.sh [--lean] [SHARED_DIR]     (SHARED_DIR default: ../shared)
#   --lean   only the omegaconf wheel (all the acceptance run installs; wandb's wheel alone is 20 MB)
set -euo pipefail
cd "$(dirname "$0")/.."

lean=0
shared=../shared
for arg in "$@"; do
    case $arg in
        --lean) lean=1 ;;
        -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
        *) shared=$arg ;;
    esac
done
tarball=$shared/datasets/cifar10-jpg.tar.gz
sha256=45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db  # ../shared/datasets/README.md
if [[ ! -d $shared/gpu/wheels || ! -f $tarball ]]; then
    echo "error: $shared/gpu/wheels or $tarball is missing; pass the shared folder, e.g. $0 /work/shared" >&2
    exit 2
fi

rm -rf .device
mkdir -p .device/wheels
if ((lean)); then
    cp "$shared"/gpu/wheels/omegaconf-*.whl .device/wheels/
else
    cp "$shared"/gpu/wheels/*.whl .device/wheels/
fi
cp "$tarball" .device/
echo "$sha256  .device/cifar10-jpg.tar.gz" | sha256sum --check --quiet
{
    git rev-parse HEAD
    git status --porcelain --untracked-files=no | sed 's/^/local change: /'
} >.device/commit.txt

if ! git check-ignore -q .device; then
    echo /.device/ >>"$(git rev-parse --git-path info/exclude)"
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
carried=$(du -sb .device | cut -f1)
# What travels besides: tracked files and untracked ones git does not ignore.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
total=$((carried + tree))
echo ".device: $(mib "$carried") ($(ls .device/wheels | wc -l) wheels, $(mib "$(du -sb .device/wheels | cut -f1)"));" \
    "working tree: $(mib "$tree"); total $(mib "$total") of 64 MiB"
if ((total > 64 * 1048576)); then
    echo "error: over the 64 MiB carry limit; run again with --lean (the acceptance run installs only omegaconf)" >&2
    exit 1
fi
