#!/usr/bin/env bash
# Usage: small-kernel.sh OUT_DIR
#
# Builds OUT_DIR/vmlinux-small: a small x86_64 Linux 6.1 kernel (ELF vmlinux, for
# `ftvm run --kernel`) from Debian's unmodified linux-source-6.1, configured as
# `make tinyconfig` plus the fragment small.config next to this script.
#
# Steps:
#   1. installs what is missing of linux-source-6.1 and the build dependencies with
#      apt-get (needs root then; nothing is installed when everything is there);
#   2. unpacks /usr/src/linux-source-6.1.tar.xz into OUT_DIR/src (once per package
#      version) and builds out of tree in OUT_DIR/build, so the source stays pristine;
#   3. `make tinyconfig`, merges small.config with scripts/kconfig/merge_config.sh -m,
#      `make olddefconfig`, then fails, naming them, if any option of the fragment did
#      not end up with the value the fragment asks for (an unmet `depends on` makes
#      Kconfig drop an option silently);
#   4. `make -j$(nproc) vmlinux` (about 2.5 minutes on our 2-core machines, from
#      scratch) and copies the result to OUT_DIR/vmlinux-small.
#
# Cache: does nothing when OUT_DIR/vmlinux-small exists and OUT_DIR/vmlinux-small.stamp
# records the same SHA-256 of small.config and of this script and the same
# linux-source-6.1 version (the installed one, or the one apt would install). A rebuild
# after a fragment change reuses OUT_DIR/build (make rebuilds what the new
# configuration changes); a new source version starts from a fresh unpack and build.
set -euo pipefail

SOURCE_PACKAGE=linux-source-6.1
TARBALL=/usr/src/$SOURCE_PACKAGE.tar.xz
# What `make vmlinux` needs besides the source: the compiler and C library headers,
# make, flex and bison (Kconfig and dtc parsers), bc (kernel/time/timeconst.bc),
# libelf-dev (objtool) and xz-utils (to unpack the source).
BUILD_PACKAGES=(make gcc libc6-dev flex bison bc libelf-dev xz-utils)
# The kernel's generic x86 ARCH (what `make` picks on an x86_64 host), as for the
# configuration measured in /work/shared/HOST.md: tinyconfig then starts 32-bit and the
# fragment's CONFIG_64BIT=y switches to 64-bit, where the options that exist only on
# 64-bit take their defaults (X86_5LEVEL, VMAP_STACK, X86_VSYSCALL_EMULATION, PKEYS and
# a few more on). ARCH=x86_64 would give a 64-bit tinyconfig with those off instead.
KERNEL_ARCH=x86
OUT_NAME=vmlinux-small

die() {
    echo "small-kernel.sh: error: $*" >&2
    exit 1
}
note() {
    echo "small-kernel.sh: $*" >&2
}

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUT_DIR"
script=$(realpath -- "${BASH_SOURCE[0]}")
fragment=$(dirname -- "$script")/small.config
[[ -f $fragment ]] || die "missing fragment $fragment"
mkdir -p -- "$1"
out_dir=$(realpath -- "$1")
dest=$out_dir/$OUT_NAME
stamp=$dest.stamp
src_root=$out_dir/src
src=$src_root/$SOURCE_PACKAGE
build=$out_dir/build

# Settings a calling make, cargo or shell may have exported that would change what the
# kernel's make does (output directory, config file, toolchain, jobserver).
unset MAKEFLAGS MFLAGS MAKELEVEL KBUILD_OUTPUT KCONFIG_CONFIG KCONFIG_ALLCONFIG \
    CROSS_COMPILE LLVM ARCH SRCARCH CONFIG_

# One run at a time per OUT_DIR (parallel test runs may call this together).
exec 9>"$out_dir/.$OUT_NAME.lock"
flock 9

is_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null) == ii* ]]
}
# The installed version of the source package, or the candidate apt would install.
source_version() {
    if is_installed "$SOURCE_PACKAGE"; then
        dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE"
    else
        apt-cache policy "$SOURCE_PACKAGE" 2>/dev/null |
            sed -n 's/^ *Candidate: \([^ ]*\)$/\1/p' | grep -vx '(none)' || true
    fi
}
stamp_text() {
    printf 'fragment-sha256 %s\nscript-sha256 %s\n%s %s\n' \
        "$(sha256sum <"$fragment" | cut -d' ' -f1)" \
        "$(sha256sum <"$script" | cut -d' ' -f1)" \
        "$SOURCE_PACKAGE" "$1"
}
banner_of() {
    LC_ALL=C grep -a -o -m 1 'Linux version [[:print:]]*' -- "$1" | head -n 1 || true
}

# --- Cache check. -------------------------------------------------------------------------
version=$(source_version)
[[ -n $version ]] || die "apt knows no $SOURCE_PACKAGE (run apt-get update as root?)"
if [[ -s $dest && -f $stamp && $(cat -- "$stamp") == "$(stamp_text "$version")" ]]; then
    note "cached: $dest"
    banner_of "$dest"
    exit 0
fi

# --- 1. Packages. -------------------------------------------------------------------------
missing=()
for package in "$SOURCE_PACKAGE" "${BUILD_PACKAGES[@]}"; do
    is_installed "$package" || missing+=("$package")
done
if ((${#missing[@]} > 0)); then
    [[ $(id -u) -eq 0 ]] ||
        die "missing packages: ${missing[*]}; install them as root: apt-get install ${missing[*]}"
    note "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        note "apt-get install failed; retrying after apt-get update"
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    version=$(dpkg-query -W -f='${Version}' "$SOURCE_PACKAGE")
fi
[[ -f $TARBALL ]] || die "$SOURCE_PACKAGE $version is installed but $TARBALL is missing"

# --- 2. Source, unpacked once per package version. ----------------------------------------
if [[ ! -f $src/Makefile || $(cat -- "$src_root/.unpacked" 2>/dev/null) != "$version" ]]; then
    note "unpacking $TARBALL ($SOURCE_PACKAGE $version) into $src_root"
    # Objects built from another source version must not survive: tar restores the
    # package's old timestamps, so make would not see the sources as newer.
    rm -rf -- "$src_root" "$src_root.tmp" "$build"
    mkdir -p -- "$src_root.tmp"
    tar -xJf "$TARBALL" -C "$src_root.tmp"
    [[ -f $src_root.tmp/$SOURCE_PACKAGE/Makefile ]] ||
        die "$TARBALL did not unpack to $SOURCE_PACKAGE/"
    printf '%s\n' "$version" >"$src_root.tmp/.unpacked"
    mv -- "$src_root.tmp" "$src_root"
fi

kmake() {
    make -C "$src" O="$build" ARCH="$KERNEL_ARCH" "$@"
}

# --- 3. Configuration. --------------------------------------------------------------------
mkdir -p -- "$build"
kmake tinyconfig
(cd "$build" && "$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$fragment")
kmake olddefconfig

# Every `CONFIG_X=value` and `# CONFIG_X is not set` line of the fragment must be in
# the final .config exactly as written.
failed=()
while IFS= read -r line; do
    line=${line%"${line##*[![:space:]]}"} # strip trailing white space
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=.*$ ]]; then
        name=${BASH_REMATCH[1]}
        want=$line
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        name=${BASH_REMATCH[1]}
        want="# $name is not set"
    else
        continue
    fi
    got=$(grep -E -m 1 "^($name=|# $name is not set\$)" "$build/.config" || true)
    if [[ $got == "$want" || ($want == "# $name is not set" && -z $got) ]]; then
        continue
    fi
    failed+=("$name: asked '$want', got '${got:-(absent: its dependencies are not met)}'")
done <"$fragment"
if ((${#failed[@]} > 0)); then
    {
        echo "small-kernel.sh: error: ${#failed[@]} option(s) of $fragment did not take effect:"
        printf '  %s\n' "${failed[@]}"
        echo "Check their 'depends on' in the Kconfig files under $src"
        echo "(grep -rn --include='Kconfig*' -E '^(menu)?config NAME\$' $src) and add what"
        echo "is missing to the fragment. The configuration is $build/.config."
    } >&2
    exit 1
fi

# --- 4. Build. ----------------------------------------------------------------------------
note "building vmlinux with $(nproc) jobs (about 2.5 minutes on 2 cores from scratch)"
kmake -j"$(nproc)" vmlinux
[[ $(od -An -tx1 -N4 -- "$build/vmlinux" | tr -d ' ') == 7f454c46 ]] ||
    die "$build/vmlinux is not an ELF file"

# Install atomically; the stamp comes last, so an interrupted run is never cached.
rm -f -- "$stamp"
cp -- "$build/vmlinux" "$dest.tmp"
mv -f -- "$dest.tmp" "$dest"
stamp_text "$version" >"$stamp"
note "wrote $dest ($(stat -c %s -- "$dest") bytes)"
banner_of "$dest"
