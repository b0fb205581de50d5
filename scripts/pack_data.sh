#!/usr/bin/env bash
# Pack a CIFAR-10 JPEG tree small enough to travel with the checkout to a GPU machine:
#   scripts/pack_data.sh DATA_DIR [ARCHIVE]      (default ARCHIVE: REPO/.carry/cifar10-jpeg.tar.xz)
# DATA_DIR is an ImageFolder tree with train/<class>/ and test/<class>/ (such as
# ../shared/data/cifar10-jpeg) or a folder holding one named cifar10-jpeg. The device machine takes the
# working tree plus carried paths, 64 MiB in all: the tracked tree is about 20 MiB and the JPEG tree
# 55 MB (60,000 files), too much together. Every one of those JPEGs repeats the same ~600 bytes of
# headers (quantisation and Huffman tables), which xz's 64 MiB window removes: the archive is about
# 18.6 MB (measured: 55,250,913 bytes in 60,000 files -> 18,572,528 bytes, xz -9, one thread, 1-6 min here).
# The images are unchanged: scripts/cifar10_window.sh unpacks the archive (Python's tarfile, data
# filter: regular files and folders only, nothing outside its folder) once into .window/data/.
# The tar is reproducible (sorted names, fixed owner and times), so the same tree gives the same bytes.
# .carry/ is ignored by git; name it in the device call's carry list:
#   run(command="scripts/cifar10_window.sh .carry/cifar10-jpeg.tar.xz $OUT", carry=[".carry"])
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: scripts/pack_data.sh DATA_DIR [ARCHIVE]" >&2
    exit 2
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SOURCE="$(cd "$1" 2>/dev/null && pwd)" || { echo "error: data folder $1 does not exist" >&2; exit 2; }
[[ -d "$SOURCE/train" && -d "$SOURCE/test" ]] || { [[ -d "$SOURCE/cifar10-jpeg" ]] && SOURCE="$SOURCE/cifar10-jpeg"; }
if [[ ! -d "$SOURCE/train" || ! -d "$SOURCE/test" ]]; then
    echo "error: $1 holds no train/ and test/ folders (nor a cifar10-jpeg/ with them); pass the CIFAR-10 JPEG tree" >&2
    exit 2
fi
ARCHIVE="${2:-$REPO/.carry/cifar10-jpeg.tar.xz}"
mkdir -p "$(dirname "$ARCHIVE")"
echo "[$(date -u +%H:%M:%S)] packing $SOURCE (train/ and test/ only) into $ARCHIVE"
tar -C "$(dirname "$SOURCE")" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
    -cf - "$(basename "$SOURCE")/train" "$(basename "$SOURCE")/test" | xz -9 -T1 >"$ARCHIVE.tmp"
mv "$ARCHIVE.tmp" "$ARCHIVE"
FILES=$(find "$SOURCE/train" "$SOURCE/test" -type f | wc -l)
BYTES=$(find "$SOURCE/train" "$SOURCE/test" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
TRACKED=$(git -C "$REPO" ls-files -z | (cd "$REPO" && xargs -0 stat -c %s 2>/dev/null) | awk '{s += $1} END {print s}')
echo "[$(date -u +%H:%M:%S)] $FILES files, $BYTES bytes -> $(stat -c %s "$ARCHIVE") bytes; tracked tree $TRACKED bytes;" \
     "together $(( (TRACKED + $(stat -c %s "$ARCHIVE")) / 1048576 )) MiB of the 64 MiB a device call carries"
