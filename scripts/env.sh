# Shared by scripts/dev.sh and scripts/test.sh: system packages and the build cache.
# Sourced, not executed.
set -euo pipefail

need_pkgs=()
command -v protoc >/dev/null 2>&1 || need_pkgs+=(protobuf-compiler)
# bindgen (for RocksDB's bindings) needs libclang; clang provides the headers it parses with.
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_pkgs+=(libclang-dev clang)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
# The jepsen/ harness: namespaces and links (iproute2), partitions and loss (iptables),
# failing fsync (fiu-utils), small filesystems for the full-disk fault (e2fsprogs).
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
command -v fiu-run >/dev/null 2>&1 || need_pkgs+=(fiu-utils)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    echo "installing system packages: ${need_pkgs[*]}" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}"
fi

# One build profile (release) for tests and runs, in a target directory that survives between
# runs: RocksDB's C++ takes many minutes to compile and must be compiled once.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
    if [ "$(id -u)" -eq 0 ]; then
        export CARGO_TARGET_DIR=/var/cache/metaraft/target
    else
        export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/metaraft/target"
    fi
fi
mkdir -p "$CARGO_TARGET_DIR"
