//! Test fixtures: the depmod index files of a small module tree, as `depmod -b` writes them.

use std::path::Path;

use super::Index;

/// Lines as `depmod -b` writes them for the guest image's tree (trimmed).
pub(super) const DEP: &str = "\
kernel/net/802/stp.ko: kernel/net/llc/llc.ko
kernel/net/llc/llc.ko:
kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/bridge/br_netfilter.ko: kernel/net/bridge/bridge.ko kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/8021q/8021q.ko: kernel/net/802/garp.ko kernel/net/802/stp.ko kernel/net/802/mrp.ko kernel/net/llc/llc.ko
kernel/net/802/garp.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko
kernel/net/802/mrp.ko:
kernel/lib/libcrc32c.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/crypto/crc32c_generic.ko:
kernel/net/netfilter/nf_conntrack.ko: kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko:
kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko:
kernel/net/netfilter/xt_REDIRECT.ko: kernel/net/netfilter/nf_nat.ko kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko kernel/net/netfilter/x_tables.ko
kernel/net/netfilter/nf_nat.ko: kernel/net/netfilter/nf_conntrack.ko kernel/net/ipv6/netfilter/nf_defrag_ipv6.ko kernel/net/ipv4/netfilter/nf_defrag_ipv4.ko kernel/lib/libcrc32c.ko
kernel/net/netfilter/x_tables.ko:
kernel/fs/overlayfs/overlay.ko:
kernel/drivers/net/tun.ko:
kernel/net/netfilter/xt_LOG.ko: kernel/net/netfilter/x_tables.ko
kernel/net/netfilter/nf_log_syslog.ko:
kernel/net/sched/act_mpls.ko:
";
/// `modules.alias`: module aliases, including several modules for one alias (`crc32c`) and a `symbol:` one.
pub(super) const ALIAS: &str = "\
# Aliases extracted from modules themselves.
alias rtnl-link-bridge bridge
alias rtnl-link-vlan 8021q
alias ipt_REDIRECT xt_REDIRECT
alias ip6t_REDIRECT xt_REDIRECT
alias fs-overlay overlay
alias char-major-10-200 tun
alias devname:net/tun tun
alias crypto-crc32c crc32c_intel
alias crc32c crc32c_intel
alias crypto-crc32c crc32c_generic
alias crc32c crc32c_generic
alias cpu:type:x86,ven*fam*mod*:feature:*0094* crc32c_intel
alias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_pci
alias symbol:nf_nat_setup_info nf_nat
";
/// `modules.softdep`: a pre-dependency, a post-dependency on a built-in module, and one with its own deps.
pub(super) const SOFTDEP: &str = "# Soft dependencies extracted from modules themselves.
softdep libcrc32c pre: crc32c
softdep act_mpls post: mpls_gso
softdep xt_LOG pre: nf_log_syslog
";
/// `modules.builtin`: paths of built-in modules.
pub(super) const BUILTIN: &str = "\
kernel/net/unix/unix.ko
kernel/net/ipv6/ipv6.ko
kernel/net/packet/af_packet.ko
kernel/net/mpls/mpls_gso.ko
";
/// `modules.builtin.modinfo`: NUL-separated `<module>.<key>=<value>` records, aliases among them.
pub(super) const MODINFO: &[u8] =
    b"unix.license=GPL\0unix.alias=net-pf-1\0ipv6.alias=net-pf-10\0af_packet.alias=net-pf-17\0";

/// The index of these files, for `/lib/modules/6.1.0-56-amd64`.
pub(super) fn index() -> Index {
    Index::from_texts(Path::new("/lib/modules/6.1.0-56-amd64"), DEP, ALIAS, SOFTDEP, BUILTIN, MODINFO)
}
