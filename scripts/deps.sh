#!/usr/bin/env bash
# Installs what podvisor's build, tests and demo need on a fresh Debian 12 machine (as root):
# Debian packages with apt-get, and the vhost-user daemons from crates.io with cargo install.
# Already-present pieces are skipped, so a second run takes a second.
set -euo pipefail

APT_PACKAGES=(
  qemu-system-x86   # the VMM
  cpio gzip kmod    # initrd assembly, module dependency order and depmod indexes
  lz4               # initrd compression (the kernel unpacks lz4 fastest under TCG: guest-image/README.md)
  python3           # vmlinux extraction (lzma)
  binutils          # readelf: checks the PVH note of the extracted kernel
  libseccomp-dev libcap-ng-dev pkg-config  # build dependencies of virtiofsd
  ca-certificates
  containerd        # 1.6.20 (pulls runc): the container manager of the end-to-end tests and the demo
  conmon skopeo     # CRI-O's tests (CRI-O itself comes from ../shared/tools/cri-o): conmon must exist for
                    # CRI-O to start; skopeo copies the test images into its storage
  busybox-static    # the test image's only binary
  systemd           # systemd-journald and journalctl for the journal test (no systemd as PID 1 needed)
  containernetworking-plugins  # CNI bridge, host-local, loopback in /usr/lib/cni for the CRI pod tests
  iproute2          # ip (bridge, routes, links in pod network namespaces), tc
  util-linux        # losetup (raw block volume test), nsenter, unshare
  iptables          # xtables-legacy-multi / xtables-nft-multi + libraries copied into the guest_kernel test image
  ipvsadm           # IPVS CLI (+ libraries) for the same image: kube-proxy's IPVS mode in the guest
  docker-registry   # distribution 2.8: the guest-pull tests' private registry (agent/src/image/tests.rs, peer
                    # pods); run as `docker-registry serve <config>`, the Debian service is never started
  prometheus        # 2.42: the observability test's private server (tests/src/prometheus.rs); the
                    # Debian service is neither started nor enabled (see below)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing Debian packages ${missing[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  echo "deps: installing ${missing[*]}"
  apt-get update -qq
  # Packages with a service (prometheus, docker-registry) must not start it: the tests run private instances.
  # A policy-rc.d answering 101 makes invoke-rc.d / deb-systemd-invoke skip every start while
  # apt runs (one already there, as in containers, is kept).
  policy=/usr/sbin/policy-rc.d own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# scripts/deps.sh: no service starts while it installs packages\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    own_policy=1
  fi
  rc=0
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  [ -z "$own_policy" ] || rm -f "$policy"
  [ "$rc" = 0 ] || exit "$rc"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for svc in prometheus docker-registry; do
      if [[ " ${missing[*]} " == *" $svc "* ]]; then
        systemctl disable --now "$svc.service" >/dev/null 2>&1 || true
      fi
    done
  fi
fi

# vhost-device-vsock (hybrid vsock when /dev/vhost-vsock is absent) and virtiofsd, pinned, into
# /usr/local/bin so that containerd and the shim find them on PATH.
install_crate() {
  local crate=$1 version=$2 bin=$3
  if [ -x "/usr/local/bin/$bin" ] && "/usr/local/bin/$bin" --version 2>/dev/null | grep -q "$version"; then
    return
  fi
  echo "deps: cargo install $crate $version"
  cargo install --quiet --locked --root /usr/local "$crate@$version"
}
install_crate vhost-device-vsock 0.3.0 vhost-device-vsock
install_crate virtiofsd 1.14.0 virtiofsd
