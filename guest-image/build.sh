#!/usr/bin/env bash
# Builds podvisor's guest image from one pinned Debian kernel package (guest-image/kernel.pin):
#
#   <out>/vmlinuz.container             the Debian bzImage (fallback for -kernel)
#   <out>/vmlinux.container             the uncompressed ELF kernel (PVH boot, ~3.5 s faster under TCG)
#   <out>/kata-containers-initrd.img    /init = the agent, the virtio modules and their load order, and the
#                                       on-demand module tree with its depmod indexes (/sbin/modprobe -> /init),
#                                       /bin/busybox and /bin/sh -> busybox (the debug console's shell)
#   <out>/test/initrd-noagent.img       /init = podvisor-noagent-init, same modules
#   <out>/test/initrd-poweroff.img      /init = podvisor-poweroff-init, no modules
#   <out>/cache/                        the .deb, its extracted tree, the staged module tree, stamps
#                                       (reruns skip unchanged work)
#
# Usage: guest-image/build.sh [--agent PATH] [--out DIR] [--noagent-init PATH] [--poweroff-init PATH]
#                             [--compress lz4|gzip|zstd]
# Nothing is installed on the host; the kernel package (and busybox-static, unless installed) is fetched
# with `apt-get download`.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
RELEASE_DIR=target/x86_64-unknown-linux-gnu/release

# The modules the guest needs; their dependencies are added by modprobe --show-depends, in this order.
#   virtio_pci / virtio_mmio      transports (pc/q35, microvm)
#   virtio_console                virtio-serial fallback channel, hvc0
#   vmw_vsock_virtio_transport    vsock (agent channel)
#   virtiofs                      shared rootfs (pulls fuse)
#   virtio_net                    networking (pulls failover, net_failover)
#   virtio_mem                    memory hotplug
#   virtio_blk                    raw block volumes (hot-plugged virtio-blk)
MODULES=(virtio_pci virtio_mmio virtio_console vmw_vsock_virtio_transport virtiofs virtio_net virtio_mem virtio_blk)
# What the dependency resolution must yield (any order); a kernel bump that changes it fails loudly.
EXPECTED_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio
                  virtio_console vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport
                  fuse virtiofs failover net_failover virtio_net virtio_mem virtio_blk)

# The on-demand module tree: modules the kernel loads itself when a container needs them
# (request_module() runs /sbin/modprobe, i.e. the agent, see agent/src/modprobe.rs). It is what a
# runc container on a Debian node can use. Nothing here is loaded at boot. The tree also holds the
# boot modules above, and the dependency closure (hard and soft dependencies, from
# modprobe --show-depends) of everything selected; depmod then indexes exactly what is staged.
# Whole directories, relative to kernel/ (every module below them; globs allowed):
ONDEMAND_DIRS=(
  net/netfilter           # nf_tables, x_tables matches/targets, conntrack, NAT, ipset, IPVS (net/netfilter/ipvs)
  net/ipv4/netfilter      # iptables: ip_tables, iptable_{filter,nat,mangle,raw,security}, nft IPv4 bits
  net/ipv6/netfilter      # ip6tables and the IPv6 counterparts
  net/bridge              # bridge, br_netfilter, ebtables and nft_bridge (net/bridge/netfilter)
  net/8021q               # VLAN devices (ip link add ... type vlan)
  net/sched               # tc: qdiscs, classifiers, actions (bandwidth CNI plugin, service meshes, CNI chaining)
  fs/overlayfs            # overlay mounts (docker-in-docker, buildkit, podman in a container)
  fs/fuse                 # fuse (a boot module already, for virtiofs), cuse
  drivers/net/vxlan       # VXLAN overlays (flannel, calico, cilium)
  drivers/net/ipvlan      # ipvlan, ipvtap (ipvlan CNI plugin)
  'net/ipv4/tcp_*.ko'     # TCP congestion control (net.ipv4.tcp_congestion_control is per network namespace)
)
# Single modules, by name (their dependencies come along):
ONDEMAND_MODULES=(
  veth tun tap macvlan macvtap dummy geneve ifb vrf bonding wireguard  # virtual devices CNI plugins create
  ipip ip_gre sit ip6_tunnel ip6_gre fou fou6                          # IP tunnels (calico IPIP, GRE, 6in4)
  inet_diag tcp_diag udp_diag raw_diag af_packet_diag unix_diag netlink_diag  # socket diagnostics (ss)
  sctp                                                                 # SCTP sockets (Kubernetes SCTP services)
  loop                                                                 # loop devices (losetup in privileged containers)
  binfmt_misc                                                          # binfmt_misc mounts (qemu-user-static registration)
  qemu_fw_cfg                                                          # podvm mode (agent.podvm): user data from fw_cfg, loaded
                                                                       # by the agent and unloaded after the read (no dependencies)
)
# Requests the kernel makes for common container operations; each must resolve in the staged
# tree, or the build fails (a kernel bump that renames something shows here).
ONDEMAND_CHECKS=(
  bridge rtnl-link-bridge rtnl-link-veth rtnl-link-vlan rtnl-link-vxlan rtnl-link-macvlan rtnl-link-ipvlan
  rtnl-link-geneve rtnl-link-dummy rtnl-link-wireguard char-major-10-200 char-major-10-237 fs-overlay fs-fuse
  fs-binfmt_misc net-pf-16-proto-12 nfnetlink-subsys-10 nfnetlink-subsys-11 nft-chain-2-nat iptable_nat
  ip6table_nat ipt_REDIRECT ip6t_REDIRECT ip_vs br_netfilter sch_htb cls_bpf act_mirred net-pf-2-proto-132
)
# Modules the agent loads in the background once it serves (below normal priority; never on the
# boot path): nothing in the kernel requests them, because iptables-legacy / ip6tables-legacy
# load them with their own modprobe in the caller's mount namespace, which a container lacks (on
# a Debian node the host has loaded them long before any container runs).
DEFERRED_MODULES=(ip_tables ip6_tables)

die() { echo "guest-image: error: $*" >&2; exit 1; }
log() { echo "guest-image: $*"; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit "${1:-0}"
}

# --- arguments --------------------------------------------------------------------------------
AGENT=$RELEASE_DIR/kata-agent
OUT=build/guest
NOAGENT_INIT=$RELEASE_DIR/podvisor-noagent-init
POWEROFF_INIT=$RELEASE_DIR/podvisor-poweroff-init
NOAGENT_EXPLICIT=0
POWEROFF_EXPLICIT=0
COMPRESS=lz4
while [ $# -gt 0 ]; do
  case $1 in
    --agent) AGENT=${2:?--agent needs a path}; shift 2 ;;
    --out) OUT=${2:?--out needs a directory}; shift 2 ;;
    --noagent-init) NOAGENT_INIT=${2:?--noagent-init needs a path}; NOAGENT_EXPLICIT=1; shift 2 ;;
    --poweroff-init) POWEROFF_INIT=${2:?--poweroff-init needs a path}; POWEROFF_EXPLICIT=1; shift 2 ;;
    --compress) COMPRESS=${2:?--compress needs lz4, gzip or zstd}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "guest-image: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done
case $COMPRESS in lz4|gzip|zstd) ;; *) die "--compress must be lz4, gzip or zstd, not '$COMPRESS'" ;; esac

# Default paths are relative to the repository (the Makefile runs from there); explicit ones to $PWD.
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
default_path() { case $1 in /*) echo "$1" ;; *) echo "$REPO_DIR/$1" ;; esac; }
AGENT=$(abspath "$AGENT")
OUT=$(abspath "$OUT")
if [ "$NOAGENT_EXPLICIT" = 1 ]; then NOAGENT_INIT=$(abspath "$NOAGENT_INIT"); else NOAGENT_INIT=$(default_path "$NOAGENT_INIT"); fi
if [ "$POWEROFF_EXPLICIT" = 1 ]; then POWEROFF_INIT=$(abspath "$POWEROFF_INIT"); else POWEROFF_INIT=$(default_path "$POWEROFF_INIT"); fi

# --- tools ------------------------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin   # depmod/modprobe live in /usr/sbin
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found: install the Debian package '$2' (apt-get install $2, or scripts/deps.sh)"; }
need apt-get apt
need dpkg-deb dpkg
need tar tar
need sha256sum coreutils
need flock util-linux
need cpio cpio
need depmod kmod
need modprobe kmod
need readelf binutils
need gzip gzip
need python3 python3
[ "$COMPRESS" = zstd ] && need zstd zstd
[ "$COMPRESS" = lz4 ] && need lz4 lz4
python3 -c 'import lzma' 2>/dev/null || die "python3 has no lzma module (needed to extract vmlinux): install the Debian package 'python3'"

# --- kernel pin -------------------------------------------------------------------------------
PIN=$SCRIPT_DIR/kernel.pin
[ -r "$PIN" ] || die "missing $PIN"
KERNEL_PKG='' KERNEL_VERSION='' KERNEL_DEB_SHA256='' KERNEL_RELEASE=''
# shellcheck source=/dev/null
. "$PIN"
for v in KERNEL_PKG KERNEL_VERSION KERNEL_DEB_SHA256 KERNEL_RELEASE; do
  [ -n "${!v}" ] || die "$PIN does not set $v"
done
DEB=${KERNEL_PKG}_${KERNEL_VERSION//:/%3a}_amd64.deb

CACHE=$OUT/cache
STAMPS=$CACHE/stamps
KTREE=$CACHE/kernel-$KERNEL_VERSION          # extracted package: boot/vmlinuz-*, lib/modules/<release>
MODDIR=$KTREE/lib/modules/$KERNEL_RELEASE
mkdir -p "$OUT/test" "$STAMPS" "$CACHE/tmp"

# One build at a time per output directory.
exec 9>"$CACHE/.lock"
flock 9

TMP=$(mktemp -d "$CACHE/tmp/build.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

sha256() { sha256sum "$1" | cut -d' ' -f1; }
fsize() { stat -c %s "$1"; }

# --- 1. the .deb --------------------------------------------------------------------------------
# The sha256 is checked after download; a cached .deb is re-hashed only if its size or mtime changed.
deb_ok_stamp=$STAMPS/deb.ok
deb_id() { stat -c '%s %Y' "$CACHE/$DEB"; }
if [ -f "$CACHE/$DEB" ] && [ "$(cat "$deb_ok_stamp" 2>/dev/null)" = "$KERNEL_DEB_SHA256 $(deb_id)" ]; then
  :
else
  if [ ! -f "$CACHE/$DEB" ]; then
    log "downloading $KERNEL_PKG=$KERNEL_VERSION"
    apt_opts=()
    # Root's apt drops to the _apt user, which cannot write into the cache dir: keep root.
    [ "$(id -u)" = 0 ] && apt_opts=(-o APT::Sandbox::User=root)
    dl() { (cd "$TMP" && apt-get "${apt_opts[@]}" -q download "$KERNEL_PKG=$KERNEL_VERSION") >"$TMP/apt.log" 2>&1; }
    if ! dl; then
      if [ "$(id -u)" = 0 ]; then
        log "apt-get download failed; running apt-get update and retrying"
        apt-get -q update >"$TMP/apt-update.log" 2>&1 || { cat "$TMP/apt-update.log" >&2; die "apt-get update failed"; }
        dl || true
      fi
      if [ ! -f "$TMP/$DEB" ]; then
        cat "$TMP/apt.log" >&2
        if [ "$(id -u)" = 0 ]; then hint="apt-get update did not help"; else hint="Run 'apt-get update' as root and retry"; fi
        die "apt-get cannot download $KERNEL_PKG version $KERNEL_VERSION.
  $hint. If Debian has superseded this version (see: apt-cache policy $KERNEL_PKG;
  apt-cache search 'linux-image-6.1.*-amd64'), update guest-image/kernel.pin with the new
  package name, version, sha256 and release (and EXPECTED_MODULES in build.sh if the set changes)."
      fi
    fi
    [ -f "$TMP/$DEB" ] || die "apt-get download did not produce $DEB (got: $(cd "$TMP" && echo *))"
    mv "$TMP/$DEB" "$CACHE/$DEB"
  fi
  got=$(sha256 "$CACHE/$DEB")
  if [ "$got" != "$KERNEL_DEB_SHA256" ]; then
    mv -f "$CACHE/$DEB" "$CACHE/$DEB.bad"
    die "sha256 mismatch for $DEB:
  expected $KERNEL_DEB_SHA256 (guest-image/kernel.pin)
  got      $got (kept as $CACHE/$DEB.bad)
  If Debian rebuilt or replaced the package on purpose, update guest-image/kernel.pin
  (package, version, sha256); otherwise the mirror served a corrupt or foreign file."
  fi
  echo "$KERNEL_DEB_SHA256 $(deb_id)" >"$deb_ok_stamp"
fi

# --- 2. extracted tree + depmod -----------------------------------------------------------------
if [ "$(cat "$KTREE/.complete" 2>/dev/null)" != "$KERNEL_DEB_SHA256" ]; then
  log "extracting $DEB"
  rm -rf "$KTREE"
  x=$TMP/tree
  mkdir -p "$x"
  dpkg-deb --fsys-tarfile "$CACHE/$DEB" | tar -x -C "$x" "./boot/vmlinuz-$KERNEL_RELEASE" "./lib/modules/$KERNEL_RELEASE" \
    || die "cannot extract boot/vmlinuz-$KERNEL_RELEASE and lib/modules/$KERNEL_RELEASE from $DEB (is KERNEL_RELEASE in kernel.pin right?)"
  # The packaged tree has no modules.dep: generate it in our copy (host depmod config ignored).
  mkdir -p "$TMP/empty-conf"
  depmod -C "$TMP/empty-conf" -b "$x" "$KERNEL_RELEASE" || die "depmod failed on the extracted module tree"
  mv "$x" "$KTREE"
  echo "$KERNEL_DEB_SHA256" >"$KTREE/.complete"
fi
VMLINUZ=$KTREE/boot/vmlinuz-$KERNEL_RELEASE
[ -f "$VMLINUZ" ] || die "$VMLINUZ missing (delete $KTREE to re-extract)"

# Drop cached kernels of other versions (after a pin bump).
for old in "$CACHE"/kernel-* "$CACHE"/linux-image-*.deb "$CACHE"/linux-image-*.deb.bad; do
  [ -e "$old" ] || continue
  case $old in "$KTREE"|"$CACHE/$DEB") continue ;; esac
  log "removing stale cache entry $old"
  rm -rf "$old"
done

# --- 3. kernels -------------------------------------------------------------------------------------
kstamp_want="$KERNEL_DEB_SHA256"
if [ "$(cat "$STAMPS/kernels" 2>/dev/null)" != "$kstamp_want $(fsize "$OUT/vmlinux.container" 2>/dev/null) $(fsize "$OUT/vmlinuz.container" 2>/dev/null)" ]; then
  log "extracting vmlinux from the bzImage"
  cp "$VMLINUZ" "$TMP/vmlinuz"
  python3 - "$TMP/vmlinuz" "$TMP/vmlinux" <<'PY'
import lzma, sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(f"guest-image: error: {src}: no xz stream (magic FD 37 7A 58 5A 00); not an xz-compressed bzImage")
dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
try:
    out = dec.decompress(data[start:])
except lzma.LZMAError as e:
    sys.exit(f"guest-image: error: xz stream at offset {start} of {src}: {e}")
if not dec.eof:
    sys.exit(f"guest-image: error: xz stream at offset {start} of {src} is truncated")
if out[:4] != b"\x7fELF":
    sys.exit("guest-image: error: the bzImage payload is not an ELF file")
with open(dst, "wb") as f:
    f.write(out)
PY
  # QEMU boots an ELF -kernel via its Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12).
  notes=$(readelf -nW "$TMP/vmlinux") || die "readelf -n failed on the extracted vmlinux"
  grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)' <<<"$notes" \
    || die "the extracted vmlinux has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): the kernel needs CONFIG_PVH=y; QEMU cannot boot it directly (use vmlinuz.container)"
  mv "$TMP/vmlinuz" "$OUT/vmlinuz.container"
  mv "$TMP/vmlinux" "$OUT/vmlinux.container"
  echo "$kstamp_want $(fsize "$OUT/vmlinux.container") $(fsize "$OUT/vmlinuz.container")" >"$STAMPS/kernels"
fi

# --- 4. module list in dependency order -------------------------------------------------------------
mkdir -p "$TMP/empty-conf"
declare -A seen=()
LOAD_ORDER=()
for m in "${MODULES[@]}"; do
  deps=$(modprobe -C "$TMP/empty-conf" -d "$KTREE" -S "$KERNEL_RELEASE" --show-depends "$m" 2>"$TMP/modprobe.err") \
    || { cat "$TMP/modprobe.err" >&2; die "modprobe --show-depends $m failed (module missing from $KERNEL_PKG?)"; }
  while read -r kind path _; do
    case $kind in
      insmod) ;;
      builtin) continue ;;   # built into the kernel: nothing to load
      *) die "unexpected modprobe --show-depends output for $m: $kind $path" ;;
    esac
    rel=${path#"$MODDIR"/}
    [ "$rel" != "$path" ] || die "modprobe returned $path, outside $MODDIR"
    case $rel in *.ko) ;; *) die "$rel: compressed modules are not supported (the agent finit_module()s plain .ko files)" ;; esac
    if [ -z "${seen[$rel]:-}" ]; then
      seen[$rel]=1
      LOAD_ORDER+=("$rel")
    fi
  done <<<"$deps"
done
got_names=$(for r in "${LOAD_ORDER[@]}"; do basename "$r" .ko; done | sort)
want_names=$(printf '%s\n' "${EXPECTED_MODULES[@]}" | sort)
if [ "$got_names" != "$want_names" ]; then
  die "the module set changed (kernel bump?); update EXPECTED_MODULES in guest-image/build.sh if this is right:
$(diff <(echo "$want_names") <(echo "$got_names") | grep '^[<>]' | sed 's/^</  missing:/; s/^>/  extra:  /')"
fi
{
  echo "# Kernel modules for $KERNEL_PKG $KERNEL_VERSION, in load order (generated by guest-image/build.sh"
  echo "# from modprobe --show-depends). Paths are relative to /lib/modules/$KERNEL_RELEASE/."
  printf '%s\n' "${LOAD_ORDER[@]}"
} >"$TMP/load-order"
if ! cmp -s "$TMP/load-order" "$CACHE/load-order"; then
  cp "$TMP/load-order" "$CACHE/load-order"
fi

# --- 5. on-demand module tree ---------------------------------------------------------------------------
# Staged in $CACHE/modtree/lib/modules/<release>/ (kept for reruns): the selected modules, the boot
# modules and their closure at their usual paths, indexed by `depmod -b` over just that subset (so
# the indexes name only modules that are present), plus load-order and load-deferred.
SCRIPT_SHA=$(cat "${BASH_SOURCE[0]}" "$PIN" | sha256sum | cut -d' ' -f1)
LOAD_ORDER_SHA=$(sha256 "$CACHE/load-order")
MODTREE=$CACHE/modtree
STAGED=$MODTREE/lib/modules/$KERNEL_RELEASE
tree_want="script=$SCRIPT_SHA kernel=$KERNEL_DEB_SHA256 load-order=$LOAD_ORDER_SHA"
if [ "$(cat "$STAMPS/modtree" 2>/dev/null)" != "$tree_want" ] || [ ! -f "$STAGED/modules.dep" ]; then
  log "staging the on-demand module tree"
  names=()
  for d in "${ONDEMAND_DIRS[@]}"; do
    found=0
    # shellcheck disable=SC2086  # the entry may be a glob
    for p in $MODDIR/kernel/$d; do
      [ -e "$p" ] || continue
      while IFS= read -r f; do
        names+=("$(basename "$f" .ko)")
        found=$((found + 1))
      done < <(find "$p" -name '*.ko' | LC_ALL=C sort)
    done
    [ "$found" -gt 0 ] || die "ONDEMAND_DIRS: no module matches kernel/$d in $KERNEL_PKG (kernel bump? update the list in guest-image/build.sh)"
  done
  names+=("${ONDEMAND_MODULES[@]}" "${DEFERRED_MODULES[@]}")
  for rel in "${LOAD_ORDER[@]}"; do names+=("$(basename "$rel" .ko)"); done
  declare -A tree=()
  for m in "${names[@]}"; do
    deps=$(modprobe -C "$TMP/empty-conf" -d "$KTREE" -S "$KERNEL_RELEASE" --show-depends "$m" 2>"$TMP/modprobe.err") \
      || { cat "$TMP/modprobe.err" >&2; die "module $m (ONDEMAND_MODULES/DEFERRED_MODULES in guest-image/build.sh) is not in $KERNEL_PKG: modprobe --show-depends $m failed"; }
    while read -r kind path _; do
      case $kind in
        insmod) ;;
        builtin) continue ;;
        *) die "unexpected modprobe --show-depends output for $m: $kind $path" ;;
      esac
      rel=${path#"$MODDIR"/}
      [ "$rel" != "$path" ] || die "modprobe returned $path, outside $MODDIR"
      case $rel in *.ko) ;; *) die "$rel: compressed modules are not supported (the agent finit_module()s plain .ko files)" ;; esac
      tree[$rel]=1
    done <<<"$deps"
  done
  rm -rf "$MODTREE" "$TMP/modtree"
  tstage=$TMP/modtree/lib/modules/$KERNEL_RELEASE
  mkdir -p "$tstage"
  for rel in "${!tree[@]}"; do
    install -D -m 0644 "$MODDIR/$rel" "$tstage/$rel"
  done
  # depmod's inputs besides the modules: built-in modules (a request for one succeeds) and their
  # aliases, and the build order (only the staged lines: depmod orders its output by it).
  cp "$MODDIR/modules.builtin" "$MODDIR/modules.builtin.modinfo" "$tstage/"
  grep -Fxf <(printf '%s\n' "${!tree[@]}") "$MODDIR/modules.order" >"$tstage/modules.order" || true
  depmod -C "$TMP/empty-conf" -b "$TMP/modtree" "$KERNEL_RELEASE" || die "depmod -b failed on the staged module tree"
  cp "$CACHE/load-order" "$tstage/load-order"
  {
    echo "# Modules the agent loads in the background after boot, by name (generated by guest-image/build.sh"
    echo "# from DEFERRED_MODULES; agent/src/modprobe.rs resolves their dependencies)."
    printf '%s\n' "${DEFERRED_MODULES[@]}"
  } >"$tstage/load-deferred"
  # Every boot module and every checked request must resolve within the staged tree alone.
  for req in "${ONDEMAND_CHECKS[@]}" "${DEFERRED_MODULES[@]}"; do
    out=$(modprobe -C "$TMP/empty-conf" -d "$TMP/modtree" -S "$KERNEL_RELEASE" --show-depends "$req" 2>&1) \
      || die "ONDEMAND_CHECKS: '$req' does not resolve in the staged module tree: $out"
    grep -q '^insmod ' <<<"$out" || die "ONDEMAND_CHECKS: '$req' resolves to no module in the staged tree: $out"
  done
  for rel in "${LOAD_ORDER[@]}"; do
    [ -f "$tstage/$rel" ] || die "boot module $rel is missing from the staged tree"
  done
  find "$TMP/modtree" -type d -exec chmod 0755 {} +
  mv "$TMP/modtree" "$MODTREE"
  echo "$tree_want" >"$STAMPS/modtree"
fi
TREE_COUNT=$(find "$STAGED" -name '*.ko' | wc -l)
TREE_BYTES=$(du -sb "$MODTREE" | cut -f1)
TREE_SHA=$(cd "$MODTREE" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)

# --- 5b. busybox: the debug console's shell ------------------------------------------------------------
# Debian's busybox-static (static, no libc needed): the installed package's binary, else the .deb
# fetched with `apt-get download` (cached in $CACHE). Only /bin/busybox and /bin/sh -> busybox go
# into the initrd: Debian builds it with FEATURE_SH_STANDALONE/PREFER_APPLETS, so its sh runs every
# applet (uname, ls, ps, cat...) without per-applet links, and the guest root stays as built.
BUSYBOX=$(dpkg-query -L busybox-static 2>/dev/null | grep -m1 -x '/bin/busybox\|/usr/bin/busybox' || true)
if [ -z "$BUSYBOX" ] || [ ! -x "$BUSYBOX" ]; then
  bb_deb=$(find "$CACHE" -maxdepth 1 -name 'busybox-static_*_amd64.deb' | LC_ALL=C sort | tail -n1)
  if [ -z "$bb_deb" ]; then
    log "downloading busybox-static (the debug console's shell)"
    bb_opts=()
    [ "$(id -u)" = 0 ] && bb_opts=(-o APT::Sandbox::User=root)
    (cd "$TMP" && apt-get "${bb_opts[@]}" -q download busybox-static) >"$TMP/apt-busybox.log" 2>&1 || {
      cat "$TMP/apt-busybox.log" >&2
      die "apt-get cannot download busybox-static (the debug console's /bin/sh); run 'apt-get update' as root, or install it: apt-get install busybox-static"
    }
    bb_deb=$(find "$TMP" -maxdepth 1 -name 'busybox-static_*_amd64.deb' | head -n1)
    [ -n "$bb_deb" ] || die "apt-get download busybox-static produced no .deb (got: $(cd "$TMP" && echo *))"
    mv "$bb_deb" "$CACHE/" && bb_deb=$CACHE/$(basename "$bb_deb")
  fi
  rm -rf "$CACHE/busybox" && mkdir -p "$CACHE/busybox"
  dpkg-deb --fsys-tarfile "$bb_deb" | tar -x -C "$CACHE/busybox" ./bin/busybox \
    || die "$bb_deb has no ./bin/busybox"
  BUSYBOX=$CACHE/busybox/bin/busybox
fi
check_init_static() {   # path what (the initrd has no libc)
  readelf -hW "$1" 2>/dev/null | grep -q 'Machine:.*X86-64' || die "$2 is not an x86-64 ELF binary: $1"
  if readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'; then die "$2 is dynamically linked: $1"; fi
}
check_init_static "$BUSYBOX" "busybox (Debian busybox-static)"
"$BUSYBOX" --list 2>/dev/null | grep -qx sh || die "$BUSYBOX has no sh applet"
BUSYBOX_SHA=$(sha256 "$BUSYBOX")

# --- 6. initrds ----------------------------------------------------------------------------------------
EPOCH=${SOURCE_DATE_EPOCH:-0}

check_init() {   # path what
  local f=$1 what=$2 hdr
  [ -f "$f" ] || die "$what not found: $f"
  hdr=$(readelf -hW "$f" 2>/dev/null) || die "$what is not an ELF executable: $f"
  grep -q 'Machine:.*X86-64' <<<"$hdr" || die "$what is not an x86-64 binary: $f"
  if readelf -lW "$f" 2>/dev/null | grep -q 'Requesting program interpreter'; then
    die "$what is dynamically linked; the initrd has no libc, /init must be static: $f"
  fi
}

# build_initrd <output> <init binary> <modules: 0 none | 1 the boot modules | 2 the whole staged tree>
build_initrd() {
  local img=$1 init=$2 mods=$3 name want stage rel
  name=$(basename "$img")
  want="script=$SCRIPT_SHA init=$(sha256 "$init") mods=$mods compress=$COMPRESS epoch=$EPOCH"
  [ "$mods" = 1 ] && want+=" kernel=$KERNEL_DEB_SHA256 load-order=$LOAD_ORDER_SHA"
  [ "$mods" = 2 ] && want+=" tree=$TREE_SHA busybox=$BUSYBOX_SHA"
  if [ -f "$img" ] && [ "$(cat "$STAMPS/$name" 2>/dev/null)" = "$want $(fsize "$img")" ]; then
    log "$name up to date"
    return
  fi
  log "building $name"
  stage=$(mktemp -d "$TMP/stage.XXXXXX")
  mkdir -p "$stage"/{dev,proc,sys,run,tmp}
  chmod 0755 "$stage" "$stage"/{dev,proc,sys,run}
  chmod 1777 "$stage/tmp"
  install -m 0755 "$init" "$stage/init"
  if [ "$mods" = 1 ]; then
    for rel in "${LOAD_ORDER[@]}"; do
      install -D -m 0644 "$MODDIR/$rel" "$stage/lib/modules/$KERNEL_RELEASE/$rel"
    done
    install -m 0644 "$CACHE/load-order" "$stage/lib/modules/$KERNEL_RELEASE/load-order"
    find "$stage/lib" -type d -exec chmod 0755 {} +
  elif [ "$mods" = 2 ]; then
    cp -a "$MODTREE/lib" "$stage/lib"
    # The kernel's request_module() runs CONFIG_MODPROBE_PATH, /sbin/modprobe: the agent, which
    # acts as modprobe when called by that name.
    mkdir -p "$stage/sbin"
    chmod 0755 "$stage/sbin"
    ln -s /init "$stage/sbin/modprobe"
    # The debug console's shell (agent/src/debug_console.rs; off unless agent.debug_console).
    mkdir -p "$stage/bin"
    chmod 0755 "$stage/bin"
    install -m 0755 "$BUSYBOX" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
  fi
  # Reproducible archive: fixed mtimes, owner 0:0, sorted names, no inode/device numbers, gzip -n.
  # lz4 needs the legacy frame format (-l), the only one the kernel's initramfs unpacker reads.
  find "$stage" -exec touch -h -d "@$EPOCH" {} +
  (cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
      | cpio --null -o -H newc --owner=0:0 --reproducible --quiet) >"$TMP/$name.cpio"
  case $COMPRESS in
    gzip) gzip -9 -n -c "$TMP/$name.cpio" >"$TMP/$name" ;;
    zstd) zstd -19 -q -c "$TMP/$name.cpio" >"$TMP/$name" ;;
    lz4) lz4 -l -9 -q -c "$TMP/$name.cpio" >"$TMP/$name" ;;
  esac
  mv "$TMP/$name" "$img"
  echo "$want $(fsize "$img")" >"$STAMPS/$name"
  rm -rf "$stage" "$TMP/$name.cpio"
}

check_init "$AGENT" "agent (--agent)"
build_initrd "$OUT/kata-containers-initrd.img" "$AGENT" 2

# The test initrds: the dial-timeout test boots one whose init is not the agent, the benchmark's
# bare-boot baseline one whose init only powers off. Their inits are built by `make agent`.
for t in noagent poweroff; do
  if [ $t = noagent ]; then f=$NOAGENT_INIT mods=1; else f=$POWEROFF_INIT mods=0; fi
  [ -e "$f" ] || die "test init $f not found; build it with \`make agent\` or pass --$t-init PATH"
  check_init "$f" "--$t-init"
  build_initrd "$OUT/test/initrd-$t.img" "$f" $mods
done

# --- summary ------------------------------------------------------------------------------------------
log "output directory: $OUT"
for f in vmlinux.container vmlinuz.container kata-containers-initrd.img test/initrd-noagent.img test/initrd-poweroff.img; do
  [ -f "$OUT/$f" ] || continue
  s=$(fsize "$OUT/$f")
  awk -v f="$f" -v s="$s" 'BEGIN { printf "  %-28s %10d bytes  %7.2f MiB\n", f, s, s / 1048576 }'
done
log "kernel $KERNEL_PKG $KERNEL_VERSION ($KERNEL_RELEASE), ${#LOAD_ORDER[@]} boot modules (order: $CACHE/load-order)"
log "on-demand module tree: $TREE_COUNT modules, $TREE_BYTES bytes uncompressed ($STAGED), initrd compression $COMPRESS"
