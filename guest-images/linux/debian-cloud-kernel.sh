#!/usr/bin/env bash
# Usage: debian-cloud-kernel.sh OUT_DIR
#
# Produces OUT_DIR/vmlinux-debian-cloud: the ELF vmlinux of Debian 12's current cloud
# kernel (linux-image-cloud-amd64, Linux 6.1), decompressed from the package's
# /boot/vmlinuz-*, for `ftvm run --kernel`. Also writes OUT_DIR/vmlinux-debian-cloud.version
# (package, version, kernel release, banner) and prints the same.
#
# How: resolves the metapackage linux-image-cloud-amd64 to the versioned image package
# with apt-cache, fetches that .deb with `apt-get download` (no root needed, nothing is
# installed), unpacks it with `dpkg-deb -x` into a temporary directory, finds the
# compressed kernel inside the bzImage by its magic bytes and decompresses it the way
# the kernel's scripts/extract-vmlinux does, keeping the first candidate that
# decompresses to a complete x86-64 ELF file. Debian compresses with LZ4 (frame magic
# 02 21 4c 18), so that is tried first; gzip, xz, bzip2, lzma, lzo and zstd follow.
#
# Cache: does nothing when OUT_DIR/vmlinux-debian-cloud exists and is newer than this
# script. Delete it to pick up a newer Debian kernel.
#
# Needs: apt (package lists that know linux-image-cloud-amd64; as root the script runs
# `apt-get update` once if they do not), dpkg-deb, GNU grep, coreutils, od, and the
# decompressor of the kernel's format (lz4 from Debian's `lz4` package for Debian's).
# `file` is used for the report when present.
set -euo pipefail

META_PACKAGE=linux-image-cloud-amd64
OUT_NAME=vmlinux-debian-cloud

die() {
    echo "debian-cloud-kernel.sh: error: $*" >&2
    exit 1
}
note() {
    echo "debian-cloud-kernel.sh: $*" >&2
}

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUT_DIR"
script=$(realpath -- "${BASH_SOURCE[0]}")
mkdir -p -- "$1"
out_dir=$(realpath -- "$1")
dest=$out_dir/$OUT_NAME
version_file=$dest.version

# One run at a time per OUT_DIR (parallel test runs may call this together).
exec 9>"$out_dir/.$OUT_NAME.lock"
flock 9

if [[ -s $dest && -s $version_file && $dest -nt $script ]]; then
    note "cached: $dest"
    cat -- "$version_file"
    exit 0
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ftvm-debian-kernel.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT

# --- Which package: the image package the metapackage currently depends on. -------------
resolve_package() {
    apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$META_PACKAGE" 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[^ <>]*-cloud-amd64\)$/\1/p' | head -n 1
}
package=$(resolve_package)
if [[ -z $package && $(id -u) -eq 0 ]]; then
    note "apt does not know $META_PACKAGE; running apt-get update"
    apt-get update -qq
    package=$(resolve_package)
fi
[[ -n $package ]] ||
    die "cannot resolve $META_PACKAGE with apt-cache depends (run apt-get update as root?)"
[[ $package == linux-image-6.1.* ]] ||
    note "warning: $META_PACKAGE now points at $package, not a 6.1 kernel"

# --- Download and unpack (nothing is installed). ----------------------------------------
mkdir "$tmp/deb" "$tmp/root"
# As root, apt downloads as the unprivileged _apt user: let it reach and write the
# directory, or it warns and falls back to an unsandboxed download.
if [[ $(id -u) -eq 0 ]] && getent passwd _apt >/dev/null; then
    chmod 755 "$tmp"
    chown _apt "$tmp/deb"
fi
note "downloading $package"
(cd "$tmp/deb" && apt-get download -q "$package") >&2
debs=("$tmp/deb/${package}_"*.deb)
[[ ${#debs[@]} -eq 1 && -f ${debs[0]} ]] || die "apt-get download left no single .deb for $package"
deb=${debs[0]}
package_version=$(dpkg-deb -f "$deb" Version)
dpkg-deb -x "$deb" "$tmp/root"
images=("$tmp/root/boot/vmlinuz-"*)
[[ ${#images[@]} -eq 1 && -f ${images[0]} ]] || die "$package has no single /boot/vmlinuz-*"
image=${images[0]}
release=${image##*/vmlinuz-}

# --- Decompress: extract-vmlinux's method. -----------------------------------------------
# An ELF file is accepted when it is 64-bit little-endian x86-64 and long enough to hold
# its section header table (which the linker puts after the sections), i.e. the
# decompressor did not stop early. The exit status of the decompressor is not used: the
# kernel appends the uncompressed size after the compressed stream, so `lz4 -d`, for one,
# reports an error after writing the whole kernel.
u8_at() { od -An -tu1 -j"$2" -N1 -- "$1" | tr -d ' '; }
u16_at() { od -An -tu2 -j"$2" -N2 --endian=little -- "$1" | tr -d ' '; }
u64_at() { od -An -tu8 -j"$2" -N8 --endian=little -- "$1" | tr -d ' '; }
is_complete_x86_64_elf() {
    local f=$1 size
    size=$(stat -c %s -- "$f")
    ((size >= 64)) || return 1
    [[ $(od -An -tx1 -N4 -- "$f" | tr -d ' ') == 7f454c46 ]] || return 1 # \x7fELF
    [[ $(u8_at "$f" 4) == 2 && $(u8_at "$f" 5) == 1 ]] || return 1      # ELFCLASS64, LSB
    [[ $(u16_at "$f" 18) == 62 ]] || return 1                           # EM_X86_64
    local shoff shentsize shnum
    shoff=$(u64_at "$f" 40)
    shentsize=$(u16_at "$f" 58)
    shnum=$(u16_at "$f" 60)
    ((size >= shoff + shentsize * shnum))
}

# name | magic (a grep -P pattern, matched byte-wise under LC_ALL=C) | decompressor (stdin
# to stdout). The magics are the ones extract-vmlinux looks for.
formats=(
    'lz4|\x02\x21\x4c\x18|lz4 -d -c'
    'gzip|\x1f\x8b\x08|gzip -d -c'
    'xz|\xfd\x37\x7a\x58\x5a\x00|xz -d -c'
    'bzip2|\x42\x5a\x68|bzip2 -d -c'
    'lzma|\x5d\x00\x00\x00|xz --format=lzma -d -c'
    'lzo|\x89\x4c\x5a|lzop -d -c'
    'zstd|\x28\xb5\x2f\xfd|zstd -d -c'
)
candidate=$tmp/vmlinux
found=
for format in "${formats[@]}"; do
    IFS='|' read -r name magic command <<<"$format"
    offsets=$(LC_ALL=C grep -obUaP -- "$magic" "$image" | cut -d: -f1) || continue
    if ! command -v "${command%% *}" >/dev/null; then
        note "warning: $name data may be inside $image but ${command%% *} is not installed"
        continue
    fi
    for offset in $offsets; do
        # shellcheck disable=SC2086 # $command is a command and its arguments
        tail -c +$((offset + 1)) -- "$image" | $command >"$candidate" 2>/dev/null || true
        if is_complete_x86_64_elf "$candidate"; then
            found="$name at byte $offset"
            break 2
        fi
    done
done
[[ -n $found ]] || die "no compressed x86-64 ELF kernel found in $image"

banner=$(LC_ALL=C grep -a -o -m 1 'Linux version [[:print:]]*' -- "$candidate" | head -n 1 || true)
report="package: $package $package_version
release: $release
payload: $found of vmlinuz-$release
banner:  ${banner:-(none found)}"

# Install atomically: the cache test above must never see a partial file.
cp -- "$candidate" "$dest.tmp"
printf '%s\n' "$report" >"$version_file"
mv -f -- "$dest.tmp" "$dest"
note "wrote $dest ($(stat -c %s -- "$dest") bytes)"
if command -v file >/dev/null; then
    file -- "$dest" >&2
fi
printf '%s\n' "$report"
