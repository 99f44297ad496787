#!/usr/bin/env bash
# Bundle what a GPU node without internet needs to run the GPU check (python -m tools.gpu_check) and
# to train, into .bundle/ (git-ignored) beside this checkout; copy the checkout with it to the node.
#
#   .bundle/wheels/              omegaconf, torch-fidelity, tqdm (and with --wandb: wandb and its
#                                dependencies): what a node with torch, torchvision, accelerate, rich,
#                                safetensors, numpy, pillow and pyyaml still lacks
#   .bundle/cifar10-jpg.tar.gz   the dataset (--data: a tarball, or a folder holding train/ and test/)
#   .bundle/classifier.safetensors  the offline quality measure's weights (trainer/quality/classifier.py)
#   .bundle/commit.txt           the commit and local changes: a copy of the tree need not have .git
#
# usage: tools/bundle_offline.sh --data PATH [--wheels DIR] [--classifier FILE] [--wandb]
#                                [--python-version 3.12] [--out DIR] [--max-mib N]
#   --data PATH         cifar10-jpg.tar.gz, or a folder holding train/<class>/ and test/<class>/
#   --wheels DIR        take wheels from this folder first; the rest are downloaded (pip download)
#   --classifier FILE   weights of `python -m tools.classifier train`; default: the cached ones
#   --wandb             also wandb and its dependencies (about 21 MB): training with W&B logging offline
#   --python-version V  the node's Python, for downloaded wheels (default: this one's)
#   --out DIR           the bundle folder (default: .bundle in the checkout)
#   --max-mib N         fail if the checkout plus the bundle exceed N MiB (for copies with a size limit)
#
# On the node, from the checkout (docs/gpu.md):
#   python3 -m pip install --no-index --find-links .bundle/wheels omegaconf torch-fidelity
#   python3 -m tools.gpu_check --out gpu-report
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; }
data="" wheels="" classifier="" wandb=0 out=.bundle max_mib="" python_version=""
while (($#)); do
    case $1 in
        --data) data=$2; shift ;;
        --wheels) wheels=$2; shift ;;
        --classifier) classifier=$2; shift ;;
        --wandb) wandb=1 ;;
        --python-version) python_version=$2; shift ;;
        --out) out=$2; shift ;;
        --max-mib) max_mib=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ -z $data ]]; then
    echo "error: --data is required: cifar10-jpg.tar.gz, or a folder holding train/ and test/" >&2
    exit 2
fi
if [[ ! -e $data ]]; then
    echo "error: --data $data does not exist" >&2
    exit 2
fi
python_version=${python_version:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}

rm -rf "$out"
mkdir -p "$out/wheels"

# Wheels: from --wheels where it has them, else downloaded for the node's Python.
packages=(omegaconf torch_fidelity tqdm)
if ((wandb)); then
    # wandb and what it needs beyond the packages a GPU node has
    packages+=(wandb annotated_types anyio certifi charset_normalizer click distro googleapis_common_protos h11
        httpcore httpx idna packaging platformdirs protobuf pydantic pydantic_core requests sniffio
        typing_extensions typing_inspection urllib3)
fi
to_download=()
for package in "${packages[@]}"; do
    found=$( (ls "${wheels:-/nonexistent}"/"${package}"-*.whl 2>/dev/null || true) | tail -1)
    if [[ -n $found ]]; then
        cp "$found" "$out/wheels/"
    else
        to_download+=("${package//_/-}")
    fi
done
if ((${#to_download[@]})); then
    # --no-deps: only what is named here (torch and the rest are on the node); binary wheels only.
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$python_version" \
        --dest "$out/wheels" "${to_download[@]}"
fi

# The dataset, as the tarball the GPU check unpacks (train/ and test/ at its top).
if [[ -d $data ]]; then
    if [[ ! -d $data/train ]]; then
        echo "error: --data $data has no train/ folder" >&2
        exit 2
    fi
    tar -czf "$out/cifar10-jpg.tar.gz" -C "$data" train $( [[ -d $data/test ]] && echo test)
else
    cp "$data" "$out/cifar10-jpg.tar.gz"
fi

# The classifier weights of the offline quality measure (1.5 MB), if any.
if [[ -z $classifier ]]; then
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/dcgan-trainer/classifier
    classifier=$( (ls -t "$cache"/cifar10-classifier-*.safetensors 2>/dev/null || true) | head -1)
fi
if [[ -n $classifier ]]; then
    cp "$classifier" "$out/classifier.safetensors"
else
    echo "note: no classifier weights (--classifier, or train them: python -m tools.classifier train" \
        "--data <cifar10-jpg>); the GPU check's quality verdict will be skipped" >&2
fi

# What the copy is: the commit and its local changes (the node has no git).
if git rev-parse HEAD >/dev/null 2>&1; then
    {
        git rev-parse HEAD
        git status --porcelain --untracked-files=no | sed 's/^/local change: /'
    } >"$out/commit.txt"
else
    echo "unknown (no git here)" >"$out/commit.txt"
fi

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bundle=$(du -sb "$out" | cut -f1)
if git rev-parse HEAD >/dev/null 2>&1; then  # the tracked files and new ones git does not ignore
    tree=$(git ls-files -z --cached --others --exclude-standard |
        python3 -c 'import os, sys; print(sum(os.path.getsize(p) for p in sys.stdin.read().split("\0") if os.path.isfile(p)))')
else
    tree=$(du -sb --exclude=.bundle --exclude=.git . | cut -f1)
fi
echo "$out: $(mib "$bundle") ($(ls "$out/wheels" | wc -l) wheels, $(mib "$(du -sb "$out/wheels" | cut -f1)"));" \
    "checkout: $(mib "$tree"); together $(mib $((bundle + tree)))"
if [[ -n $max_mib ]] && ((bundle + tree > max_mib * 1048576)); then
    echo "error: over the --max-mib $max_mib limit; leave out --wandb (the GPU check does not need it)" >&2
    exit 1
fi
