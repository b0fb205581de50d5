#!/usr/bin/env bash
# Pack a data set small enough to travel with the checkout to a GPU machine:
#   scripts/pack_data.sh DATA_DIR [ARCHIVE]
# DATA_DIR is either
#   * a CIFAR-10 ImageFolder tree with train/<class>/ and test/<class>/ (such as ../shared/data/cifar10-jpeg)
#     or a folder holding one named cifar10-jpeg  -> default ARCHIVE REPO/.carry/cifar10-jpeg.tar.xz; or
#   * MNIST in torchvision's layout: a folder holding MNIST/raw/ (such as ../shared/data), MNIST/ itself
#     -> default ARCHIVE REPO/.carry/mnist.tar.xz (it unpacks to MNIST/raw/, what --data-root expects).
# The device machine takes the working tree plus carried paths, 64 MiB in all, and the tracked tree is
# about 20 MiB. CIFAR-10's JPEG tree is 55 MB (60,000 files), too much beside it; every one of those JPEGs
# repeats the same ~600 bytes of headers (quantisation and Huffman tables), which xz's 64 MiB window
# removes: the archive is about 18.6 MB (measured: 55,250,913 bytes in 60,000 files -> 18,572,528 bytes,
# xz -9, one thread, 1-6 min here). MNIST's four raw files (54,950,048 bytes) pack to 9,226,540 bytes (measured, xz -9, 80 s here).
# The files are unchanged: the window scripts (scripts/window_lib.sh, window_data) unpack the archive
# (Python's tarfile, data filter: regular files and folders only, nothing outside its folder) once into
# .window/data/. The tar is reproducible (sorted names, fixed owner and times): the same tree gives the
# same bytes. .carry/ is ignored by git; name it in the device call's carry list:
#   run(command="scripts/cifar10_window.sh .carry/cifar10-jpeg.tar.xz $OUT", carry=[".carry"])
#   run(command="scripts/reproduce_window.sh .carry/mnist.tar.xz $OUT", carry=[".carry"])
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: scripts/pack_data.sh DATA_DIR [ARCHIVE]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="$(cd "$1" 2>/dev/null && pwd)" || { echo "error: data folder $1 does not exist" >&2; exit 2; }
[[ -d "$SOURCE/raw" && "$(basename "$SOURCE")" == MNIST ]] && SOURCE="$(dirname "$SOURCE")"
if [[ -d "$SOURCE/MNIST/raw" ]]; then  # MNIST: the archive holds MNIST/raw/<the four files>
    PARENT="$SOURCE"
    MEMBERS=(MNIST/raw)
    ARCHIVE="${2:-$REPO/.carry/mnist.tar.xz}"
    WHAT="MNIST/raw"
else
    [[ -d "$SOURCE/train" && -d "$SOURCE/test" ]] || { [[ -d "$SOURCE/cifar10-jpeg" ]] && SOURCE="$SOURCE/cifar10-jpeg"; }
    if [[ ! -d "$SOURCE/train" || ! -d "$SOURCE/test" ]]; then
        echo "error: $1 holds neither MNIST/raw/ nor train/ and test/ folders (nor a cifar10-jpeg/ with them);" \
             "pass the MNIST root or the CIFAR-10 JPEG tree" >&2
        exit 2
    fi
    PARENT="$(dirname "$SOURCE")"
    MEMBERS=("$(basename "$SOURCE")/train" "$(basename "$SOURCE")/test")
    ARCHIVE="${2:-$REPO/.carry/cifar10-jpeg.tar.xz}"
    WHAT="train/ and test/"
fi
mkdir -p "$(dirname "$ARCHIVE")"
echo "[$(date -u +%H:%M:%S)] packing $PARENT ($WHAT only) into $ARCHIVE"
tar -C "$PARENT" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf - "${MEMBERS[@]}" \
    | xz -9 -T1 >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
FILES=$(cd "$PARENT" && find "${MEMBERS[@]}" -type f | wc -l)
BYTES=$(cd "$PARENT" && find "${MEMBERS[@]}" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
# (a tracked file deleted in the working tree has no size: not an error, it does not travel)
TRACKED=$(git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 stat -c %s 2>/dev/null; true) | awk '{s += $1} END {print s}')
echo "[$(date -u +%H:%M:%S)] $FILES files, $BYTES bytes -> $(stat -c %s "$ARCHIVE") bytes; tracked tree $TRACKED bytes;" \
     "together $(( (TRACKED + $(stat -c %s "$ARCHIVE")) / 1048576 )) MiB of the 64 MiB a device call carries"
