//! Conversions between the `oci-spec` crate's [`oci_spec::runtime::Spec`] (the OCI runtime
//! spec as read from a bundle's `config.json`) and the protobuf [`oci::Spec`] that Kata's agent
//! protocol carries in `CreateContainerRequest.OCI`.
//!
//! * [`spec_to_grpc`] never fails: every value `oci-spec` can hold has a protobuf encoding
//!   (the two clamps listed below only touch values the runtime spec calls invalid).
//! * [`spec_from_grpc`] checks what the protobuf side cannot type: enum strings and
//!   integers that are wider on the wire than in the OCI types. A [`ConvertError`] names the
//!   offending field by its protobuf path, e.g. `Linux.Namespaces[1].Type`.
//!
//! # Enum spellings
//!
//! Enums that `oci.proto` stores as strings use the OCI JSON spellings, as Kata's Go runtime
//! sends them: namespace types `"pid"`, `"network"`, `"mount"`, `"ipc"`, `"uts"`, `"user"`,
//! `"cgroup"`, `"time"`; device types `"a"`, `"c"`, `"b"`, `"u"`, `"p"`; capabilities
//! `"CAP_SYS_ADMIN"`; rlimits `"RLIMIT_NOFILE"`; seccomp `"SCMP_ACT_ERRNO"`,
//! `"SCMP_ARCH_X86_64"`, `"SCMP_CMP_MASKED_EQ"`, `"SECCOMP_FILTER_FLAG_LOG"`. Capability sets
//! are unordered in `oci-spec`, so they are sent sorted. On the way back the spellings of
//! Kata's Rust runtime are accepted too (`"net"`, `"mnt"`, capabilities without `CAP_`).
//!
//! # Absent values (zero → `None`)
//!
//! proto3 scalars have no presence, so `None` is sent as the zero value (`0`, `false`, `""`,
//! empty list or map) and the following come back as `None` when zero/empty:
//!
//! * every `Option<String>`/`Option<PathBuf>` when `""`: hostname, apparmor profile, SELinux
//!   label, username, mount type and source, cgroups path, namespace path, rootfs propagation,
//!   mount label, device-cgroup access, CPU `cpus`/`mems`, Intel RDT L3 cache schema;
//! * every `Option<Vec<_>>`/`Option<HashMap<_, _>>` when empty: args, env, additional gids,
//!   the five capability sets, rlimits, mounts, mount options, annotations, every hook list,
//!   hook args/env, uid/gid mappings, sysctl, namespaces, devices, masked/readonly paths,
//!   resource device rules, hugepage limits, block-IO device lists, network priorities,
//!   seccomp architectures/flags/syscalls, syscall args;
//! * `Option<bool>` when `false`: `process.terminal`, `process.noNewPrivileges`,
//!   `root.readonly`, `memory.disableOOMKiller`;
//! * `Option<number>` when `0`: `process.oomScoreAdj`, hook timeout, memory limit,
//!   reservation, swap, kernel, kernelTCP and swappiness, CPU shares, quota, period,
//!   realtimeRuntime and realtimePeriod, blockIO weight and leafWeight (also per device),
//!   network classID, device-cgroup major and minor (`None` is the `*` wildcard), device
//!   fileMode, uid and gid, seccomp arg valueTwo.
//!
//! Negative values such as a memory limit of `-1` (unlimited) do round-trip. Messages have
//! presence on the wire, so an optional struct (`process`, `root`, `hooks`, `linux`,
//! `resources`, `memory`, `cpu`, `pids`, `blockIO`, `network`, `seccomp`, `intelRdt`,
//! `consoleSize`, `capabilities`) comes back `Some` exactly when it was `Some`, even if all its
//! fields are zero. A syscall's `errnoRet` is a protobuf `oneof`, so `Some(0)` round-trips.
//! `process.user` is not optional in `oci-spec`: it is always sent, and an absent
//! `Process.User` comes back as uid 0, gid 0.
//!
//! # Not carried by `oci.proto`
//!
//! These `oci-spec` fields have no protobuf field; they are dropped by [`spec_to_grpc`] and are
//! `None` after [`spec_from_grpc`]: `domainname`, `solaris`, `windows`, `vm`, `zos`,
//! `process.commandLine`, `process.user.umask`, `process.ioPriority`, `process.scheduler`,
//! `process.execCPUAffinity`, mount `uidMappings`/`gidMappings`, `linux.netDevices`,
//! `linux.memoryPolicy`, `linux.personality`, `linux.timeOffsets`, `resources.rdma`,
//! `resources.unified`, `memory.useHierarchy`, `memory.checkBeforeUpdate`, `cpu.idle`,
//! `cpu.burst`, `seccomp.defaultErrnoRet`, `seccomp.listenerPath`, `seccomp.listenerMetadata`,
//! and every Intel RDT field but `l3CacheSchema`. Two clamps in [`spec_to_grpc`]: a console
//! size above `u32::MAX` becomes `u32::MAX`, and a negative hugepage limit (the runtime spec
//! types it `uint64`) becomes `0`. Non-UTF-8 paths are converted lossily.
//!
//! [`oci::Spec`]: crate::oci::Spec
//! [`spec_to_grpc`]: crate::convert::spec_to_grpc
//! [`spec_from_grpc`]: crate::convert::spec_from_grpc
//! [`ConvertError`]: crate::convert::ConvertError

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime as rt;
use protobuf::MessageField;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::oci as grpc;

/// A protobuf value that has no `oci-spec` equivalent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A string that is not one of the spellings the OCI spec allows for the field.
    #[error("{field}: invalid value {value:?}")]
    Invalid {
        /// Protobuf path of the field, e.g. `Linux.Namespaces[1].Type`.
        field: String,
        /// The rejected value.
        value: String,
    },
    /// A number that does not fit the field's `oci-spec` type.
    #[error("{field}: value {value} is out of range")]
    OutOfRange {
        /// Protobuf path of the field, e.g. `Process.OOMScoreAdj`.
        field: String,
        /// The rejected value.
        value: String,
    },
}

impl ConvertError {
    /// The protobuf path of the offending field, e.g. `Process.Capabilities.Bounding[0]`.
    pub fn field(&self) -> &str {
        match self {
            Self::Invalid { field, .. } | Self::OutOfRange { field, .. } => field,
        }
    }

    /// The rejected value, as text.
    pub fn value(&self) -> &str {
        match self {
            Self::Invalid { value, .. } | Self::OutOfRange { value, .. } => value,
        }
    }

    fn invalid(field: &str, value: &str) -> Self {
        Self::Invalid { field: field.to_owned(), value: value.to_owned() }
    }

    /// Prefixes the field path with the enclosing field `parent`.
    fn within(mut self, parent: &str) -> Self {
        let (Self::Invalid { field, .. } | Self::OutOfRange { field, .. }) = &mut self;
        *field = if field.is_empty() { parent.to_owned() } else { format!("{parent}.{field}") };
        self
    }
}

type Result<T> = std::result::Result<T, ConvertError>;

// ---------------------------------------------------------------------------------------------
// Helpers, `oci-spec` → protobuf.

/// The OCI JSON spelling of an enum value (its serde string form).
fn enum_str<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn opt_path_str(path: &Option<PathBuf>) -> String {
    path.as_deref().map(path_str).unwrap_or_default()
}

fn string(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn z<T: Default>(value: Option<T>) -> T {
    value.unwrap_or_default()
}

fn msg<T, U>(value: &Option<T>, f: impl FnOnce(&T) -> U) -> MessageField<U> {
    MessageField::from_option(value.as_ref().map(f))
}

fn vec_of<T, U>(value: &Option<Vec<T>>, f: impl FnMut(&T) -> U) -> Vec<U> {
    value.iter().flatten().map(f).collect()
}

// ---------------------------------------------------------------------------------------------
// Helpers, protobuf → `oci-spec`.

/// Parses an OCI JSON enum spelling through the type's serde implementation.
fn parse<T: DeserializeOwned>(field: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_owned())).map_err(|_| ConvertError::invalid(field, value))
}

/// A narrowing integer conversion.
fn fit<T: TryFrom<S>, S: Copy + ToString>(field: &str, value: S) -> Result<T> {
    T::try_from(value).map_err(|_| ConvertError::OutOfRange { field: field.to_owned(), value: value.to_string() })
}

/// `None` for the zero value.
fn nz<T: Default + PartialEq>(value: T) -> Option<T> {
    (value != T::default()).then_some(value)
}

fn opt_str(value: &str) -> Option<String> {
    (!value.is_empty()).then(|| value.to_owned())
}

fn opt_path(value: &str) -> Option<PathBuf> {
    (!value.is_empty()).then(|| PathBuf::from(value))
}

fn opt_vec<T: Clone>(value: &[T]) -> Option<Vec<T>> {
    (!value.is_empty()).then(|| value.to_vec())
}

fn opt_map(value: &HashMap<String, String>) -> Option<HashMap<String, String>> {
    (!value.is_empty()).then(|| value.clone())
}

/// The result of an `oci-spec` builder. The builders used here have no validation and every
/// field has a default, so this cannot fail in practice; an error still names the field.
fn built<T>(result: std::result::Result<T, oci_spec::OciSpecError>) -> Result<T> {
    result.map_err(|e| ConvertError::invalid("", &e.to_string()))
}

/// Converts a present message; errors are prefixed with `field`.
fn msg_from<G, O>(field: &str, value: &MessageField<G>, f: impl FnOnce(&G) -> Result<O>) -> Result<Option<O>> {
    value.as_ref().map(|g| f(g).map_err(|e| e.within(field))).transpose()
}

/// Converts a non-empty list; errors are prefixed with `field[index]`.
fn list<G, O>(field: &str, items: &[G], mut f: impl FnMut(&G) -> Result<O>) -> Result<Option<Vec<O>>> {
    if items.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        out.push(f(item).map_err(|e| e.within(&format!("{field}[{i}]")))?);
    }
    Ok(Some(out))
}

/// Converts a list of strings that are enum spellings.
fn enum_list<T: DeserializeOwned>(field: &str, items: &[String]) -> Result<Option<Vec<T>>> {
    list(field, items, |s| parse("", s))
}

// ---------------------------------------------------------------------------------------------
// Spec.

/// Converts an OCI runtime spec to the protobuf form sent to Kata's agent.
pub fn spec_to_grpc(spec: &rt::Spec) -> grpc::Spec {
    grpc::Spec {
        Version: spec.version().clone(),
        Process: msg(spec.process(), process_to_grpc),
        Root: msg(spec.root(), |r| grpc::Root {
            Path: path_str(r.path()),
            Readonly: z(r.readonly()),
            ..Default::default()
        }),
        Hostname: string(spec.hostname()),
        Mounts: vec_of(spec.mounts(), |m| grpc::Mount {
            destination: path_str(m.destination()),
            source: opt_path_str(m.source()),
            type_: string(m.typ()),
            options: z(m.options().clone()),
            ..Default::default()
        }),
        Hooks: msg(spec.hooks(), hooks_to_grpc),
        Annotations: z(spec.annotations().clone()),
        Linux: msg(spec.linux(), linux_to_grpc),
        ..Default::default()
    }
}

/// Converts the protobuf spec received from a Kata runtime to an OCI runtime spec, applying the
/// zero → `None` rules of the [module documentation](self).
pub fn spec_from_grpc(spec: &grpc::Spec) -> Result<rt::Spec> {
    let mut out = rt::Spec::default();
    out.set_version(spec.Version.clone())
        .set_process(msg_from("Process", &spec.Process, process_from_grpc)?)
        .set_root(msg_from("Root", &spec.Root, |r| {
            let mut root = rt::Root::default();
            root.set_path(PathBuf::from(&r.Path)).set_readonly(nz(r.Readonly));
            Ok(root)
        })?)
        .set_hostname(opt_str(&spec.Hostname))
        .set_mounts(list("Mounts", &spec.Mounts, |m| {
            let mut mount = rt::Mount::default();
            mount
                .set_destination(PathBuf::from(&m.destination))
                .set_typ(opt_str(&m.type_))
                .set_source(opt_path(&m.source))
                .set_options(opt_vec(&m.options));
            Ok(mount)
        })?)
        .set_hooks(msg_from("Hooks", &spec.Hooks, hooks_from_grpc)?)
        .set_annotations(opt_map(&spec.Annotations))
        .set_linux(msg_from("Linux", &spec.Linux, linux_from_grpc)?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Process.

fn process_to_grpc(p: &rt::Process) -> grpc::Process {
    let user = p.user();
    let size = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    grpc::Process {
        Terminal: z(p.terminal()),
        ConsoleSize: msg(&p.console_size(), |b| grpc::Box {
            Height: size(b.height()),
            Width: size(b.width()),
            ..Default::default()
        }),
        User: MessageField::some(grpc::User {
            UID: user.uid(),
            GID: user.gid(),
            AdditionalGids: z(user.additional_gids().clone()),
            Username: string(user.username()),
            ..Default::default()
        }),
        Args: z(p.args().clone()),
        Env: z(p.env().clone()),
        Cwd: path_str(p.cwd()),
        Capabilities: msg(p.capabilities(), |c| {
            let set = |s: &Option<rt::Capabilities>| {
                let mut names: Vec<String> = s.iter().flatten().map(enum_str).collect();
                names.sort();
                names
            };
            grpc::LinuxCapabilities {
                Bounding: set(c.bounding()),
                Effective: set(c.effective()),
                Inheritable: set(c.inheritable()),
                Permitted: set(c.permitted()),
                Ambient: set(c.ambient()),
                ..Default::default()
            }
        }),
        Rlimits: vec_of(p.rlimits(), |r| grpc::POSIXRlimit {
            Type: enum_str(&r.typ()),
            Hard: r.hard(),
            Soft: r.soft(),
            ..Default::default()
        }),
        NoNewPrivileges: z(p.no_new_privileges()),
        ApparmorProfile: string(p.apparmor_profile()),
        OOMScoreAdj: z(p.oom_score_adj()).into(),
        SelinuxLabel: string(p.selinux_label()),
        ..Default::default()
    }
}

/// Converts a protobuf process (an `ExecProcessRequest`'s) to an OCI process, with the same
/// rules as [`spec_from_grpc`]; error fields are relative to the process (`Args`, not
/// `Process.Args`).
pub fn process_from_grpc(p: &grpc::Process) -> Result<rt::Process> {
    let mut user = rt::User::default();
    if let Some(u) = p.User.as_ref() {
        user.set_uid(u.UID)
            .set_gid(u.GID)
            .set_additional_gids(opt_vec(&u.AdditionalGids))
            .set_username(opt_str(&u.Username));
    }
    let capabilities = msg_from("Capabilities", &p.Capabilities, |c| {
        let set = |field: &str, names: &[String]| -> Result<Option<rt::Capabilities>> {
            Ok(enum_list::<rt::Capability>(field, names)?.map(|v| v.into_iter().collect()))
        };
        let mut caps = rt::LinuxCapabilities::default();
        caps.set_bounding(set("Bounding", &c.Bounding)?)
            .set_effective(set("Effective", &c.Effective)?)
            .set_inheritable(set("Inheritable", &c.Inheritable)?)
            .set_permitted(set("Permitted", &c.Permitted)?)
            .set_ambient(set("Ambient", &c.Ambient)?);
        Ok(caps)
    })?;
    let rlimits = list("Rlimits", &p.Rlimits, |r| {
        let typ: rt::PosixRlimitType = parse("Type", &r.Type)?;
        built(rt::PosixRlimitBuilder::default().typ(typ).hard(r.Hard).soft(r.Soft).build())
    })?;
    let console_size = msg_from("ConsoleSize", &p.ConsoleSize, |b| {
        built(rt::BoxBuilder::default().height(b.Height).width(b.Width).build())
    })?;
    let mut out = rt::Process::default();
    out.set_terminal(nz(p.Terminal))
        .set_console_size(console_size)
        .set_user(user)
        .set_args(opt_vec(&p.Args))
        .set_env(opt_vec(&p.Env))
        .set_cwd(PathBuf::from(&p.Cwd))
        .set_capabilities(capabilities)
        .set_rlimits(rlimits)
        .set_no_new_privileges(nz(p.NoNewPrivileges))
        .set_apparmor_profile(opt_str(&p.ApparmorProfile))
        .set_oom_score_adj(nz(fit("OOMScoreAdj", p.OOMScoreAdj)?))
        .set_selinux_label(opt_str(&p.SelinuxLabel));
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Hooks.

fn hook_to_grpc(h: &rt::Hook) -> grpc::Hook {
    grpc::Hook {
        Path: path_str(h.path()),
        Args: z(h.args().clone()),
        Env: z(h.env().clone()),
        Timeout: z(h.timeout()),
        ..Default::default()
    }
}

fn hook_from_grpc(h: &grpc::Hook) -> Result<rt::Hook> {
    let mut hook = rt::Hook::default();
    hook.set_path(PathBuf::from(&h.Path))
        .set_args(opt_vec(&h.Args))
        .set_env(opt_vec(&h.Env))
        .set_timeout(nz(h.Timeout));
    Ok(hook)
}

#[allow(deprecated)] // `prestart` is deprecated in the runtime spec but still carried
fn hooks_to_grpc(h: &rt::Hooks) -> grpc::Hooks {
    let hooks = |list: &Option<Vec<rt::Hook>>| vec_of(list, hook_to_grpc);
    grpc::Hooks {
        Prestart: hooks(h.prestart()),
        Poststart: hooks(h.poststart()),
        Poststop: hooks(h.poststop()),
        CreateRuntime: hooks(h.create_runtime()),
        CreateContainer: hooks(h.create_container()),
        StartContainer: hooks(h.start_container()),
        ..Default::default()
    }
}

#[allow(deprecated)]
fn hooks_from_grpc(h: &grpc::Hooks) -> Result<rt::Hooks> {
    let mut out = rt::Hooks::default();
    out.set_prestart(list("Prestart", &h.Prestart, hook_from_grpc)?)
        .set_poststart(list("Poststart", &h.Poststart, hook_from_grpc)?)
        .set_poststop(list("Poststop", &h.Poststop, hook_from_grpc)?)
        .set_create_runtime(list("CreateRuntime", &h.CreateRuntime, hook_from_grpc)?)
        .set_create_container(list("CreateContainer", &h.CreateContainer, hook_from_grpc)?)
        .set_start_container(list("StartContainer", &h.StartContainer, hook_from_grpc)?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Linux.

fn id_mapping_to_grpc(m: &rt::LinuxIdMapping) -> grpc::LinuxIDMapping {
    grpc::LinuxIDMapping { HostID: m.host_id(), ContainerID: m.container_id(), Size: m.size(), ..Default::default() }
}

fn id_mapping_from_grpc(m: &grpc::LinuxIDMapping) -> Result<rt::LinuxIdMapping> {
    let mapping = rt::LinuxIdMappingBuilder::default().host_id(m.HostID).container_id(m.ContainerID);
    built(mapping.size(m.Size).build())
}

fn linux_to_grpc(l: &rt::Linux) -> grpc::Linux {
    grpc::Linux {
        UIDMappings: vec_of(l.uid_mappings(), id_mapping_to_grpc),
        GIDMappings: vec_of(l.gid_mappings(), id_mapping_to_grpc),
        Sysctl: z(l.sysctl().clone()),
        Resources: msg(l.resources(), resources_to_grpc),
        CgroupsPath: opt_path_str(l.cgroups_path()),
        Namespaces: vec_of(l.namespaces(), |n| grpc::LinuxNamespace {
            Type: enum_str(&n.typ()),
            Path: opt_path_str(n.path()),
            ..Default::default()
        }),
        Devices: vec_of(l.devices(), |d| grpc::LinuxDevice {
            Path: path_str(d.path()),
            Type: d.typ().as_str().to_owned(),
            Major: d.major(),
            Minor: d.minor(),
            FileMode: z(d.file_mode()),
            UID: z(d.uid()),
            GID: z(d.gid()),
            ..Default::default()
        }),
        Seccomp: msg(l.seccomp(), seccomp_to_grpc),
        RootfsPropagation: string(l.rootfs_propagation()),
        MaskedPaths: z(l.masked_paths().clone()),
        ReadonlyPaths: z(l.readonly_paths().clone()),
        MountLabel: string(l.mount_label()),
        IntelRdt: msg(l.intel_rdt(), |r| grpc::LinuxIntelRdt {
            L3CacheSchema: string(r.l3_cache_schema()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn linux_from_grpc(l: &grpc::Linux) -> Result<rt::Linux> {
    let mut out = rt::Linux::default();
    out.set_uid_mappings(list("UIDMappings", &l.UIDMappings, id_mapping_from_grpc)?)
        .set_gid_mappings(list("GIDMappings", &l.GIDMappings, id_mapping_from_grpc)?)
        .set_sysctl(opt_map(&l.Sysctl))
        .set_resources(msg_from("Resources", &l.Resources, resources_from_grpc)?)
        .set_cgroups_path(opt_path(&l.CgroupsPath))
        .set_namespaces(list("Namespaces", &l.Namespaces, |n| {
            let typ = rt::LinuxNamespaceType::try_from(n.Type.as_str())
                .map_err(|_| ConvertError::invalid("Type", &n.Type))?;
            let mut ns = rt::LinuxNamespace::default();
            ns.set_typ(typ).set_path(opt_path(&n.Path));
            Ok(ns)
        })?)
        .set_devices(list("Devices", &l.Devices, |d| {
            let mut dev = rt::LinuxDevice::default();
            dev.set_path(PathBuf::from(&d.Path))
                .set_typ(parse("Type", &d.Type)?)
                .set_major(d.Major)
                .set_minor(d.Minor)
                .set_file_mode(nz(d.FileMode))
                .set_uid(nz(d.UID))
                .set_gid(nz(d.GID));
            Ok(dev)
        })?)
        .set_seccomp(msg_from("Seccomp", &l.Seccomp, seccomp_from_grpc)?)
        .set_rootfs_propagation(opt_str(&l.RootfsPropagation))
        .set_masked_paths(opt_vec(&l.MaskedPaths))
        .set_readonly_paths(opt_vec(&l.ReadonlyPaths))
        .set_mount_label(opt_str(&l.MountLabel))
        .set_intel_rdt(msg_from("IntelRdt", &l.IntelRdt, |r| {
            let mut rdt = rt::LinuxIntelRdt::default();
            rdt.set_l3_cache_schema(opt_str(&r.L3CacheSchema));
            Ok(rdt)
        })?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Resources.

fn throttle_to_grpc(t: &rt::LinuxThrottleDevice) -> grpc::LinuxThrottleDevice {
    grpc::LinuxThrottleDevice { Major: t.major(), Minor: t.minor(), Rate: t.rate(), ..Default::default() }
}

fn throttle_from_grpc(t: &grpc::LinuxThrottleDevice) -> Result<rt::LinuxThrottleDevice> {
    built(rt::LinuxThrottleDeviceBuilder::default().major(t.Major).minor(t.Minor).rate(t.Rate).build())
}

#[allow(deprecated)] // kernel memory limits are deprecated but still carried
fn resources_to_grpc(r: &rt::LinuxResources) -> grpc::LinuxResources {
    let weight = |w: Option<u16>| w.map(u32::from).unwrap_or_default();
    grpc::LinuxResources {
        Devices: vec_of(r.devices(), |d| grpc::LinuxDeviceCgroup {
            Allow: d.allow(),
            Type: d.typ().map(|t| t.as_str().to_owned()).unwrap_or_default(),
            Major: z(d.major()),
            Minor: z(d.minor()),
            Access: string(d.access()),
            ..Default::default()
        }),
        Memory: msg(r.memory(), |m| grpc::LinuxMemory {
            Limit: z(m.limit()),
            Reservation: z(m.reservation()),
            Swap: z(m.swap()),
            Kernel: z(m.kernel()),
            KernelTCP: z(m.kernel_tcp()),
            Swappiness: z(m.swappiness()),
            DisableOOMKiller: z(m.disable_oom_killer()),
            ..Default::default()
        }),
        CPU: msg(r.cpu(), |c| grpc::LinuxCPU {
            Shares: z(c.shares()),
            Quota: z(c.quota()),
            Period: z(c.period()),
            RealtimeRuntime: z(c.realtime_runtime()),
            RealtimePeriod: z(c.realtime_period()),
            Cpus: string(c.cpus()),
            Mems: string(c.mems()),
            ..Default::default()
        }),
        Pids: msg(r.pids(), |p| grpc::LinuxPids { Limit: p.limit(), ..Default::default() }),
        BlockIO: msg(r.block_io(), |b| grpc::LinuxBlockIO {
            Weight: weight(b.weight()),
            LeafWeight: weight(b.leaf_weight()),
            WeightDevice: vec_of(b.weight_device(), |d| grpc::LinuxWeightDevice {
                Major: d.major(),
                Minor: d.minor(),
                Weight: weight(d.weight()),
                LeafWeight: weight(d.leaf_weight()),
                ..Default::default()
            }),
            ThrottleReadBpsDevice: vec_of(b.throttle_read_bps_device(), throttle_to_grpc),
            ThrottleWriteBpsDevice: vec_of(b.throttle_write_bps_device(), throttle_to_grpc),
            ThrottleReadIOPSDevice: vec_of(b.throttle_read_iops_device(), throttle_to_grpc),
            ThrottleWriteIOPSDevice: vec_of(b.throttle_write_iops_device(), throttle_to_grpc),
            ..Default::default()
        }),
        HugepageLimits: vec_of(r.hugepage_limits(), |h| grpc::LinuxHugepageLimit {
            Pagesize: h.page_size().clone(),
            Limit: u64::try_from(h.limit()).unwrap_or(0),
            ..Default::default()
        }),
        Network: msg(r.network(), |n| grpc::LinuxNetwork {
            ClassID: z(n.class_id()),
            Priorities: vec_of(n.priorities(), |p| grpc::LinuxInterfacePriority {
                Name: p.name().clone(),
                Priority: p.priority(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[allow(deprecated)]
fn resources_from_grpc(r: &grpc::LinuxResources) -> Result<rt::LinuxResources> {
    let weight = |field: &str, w: u32| -> Result<Option<u16>> { Ok(nz(fit(field, w)?)) };
    let mut out = rt::LinuxResources::default();
    out.set_devices(list("Devices", &r.Devices, |d| {
        let typ = match d.Type.as_str() {
            "" => None,
            t => Some(parse("Type", t)?),
        };
        let mut rule = rt::LinuxDeviceCgroup::default();
        rule.set_allow(d.Allow)
            .set_typ(typ)
            .set_major(nz(d.Major))
            .set_minor(nz(d.Minor))
            .set_access(opt_str(&d.Access));
        Ok(rule)
    })?)
    .set_memory(msg_from("Memory", &r.Memory, |m| {
        let mut mem = rt::LinuxMemory::default();
        mem.set_limit(nz(m.Limit))
            .set_reservation(nz(m.Reservation))
            .set_swap(nz(m.Swap))
            .set_kernel(nz(m.Kernel))
            .set_kernel_tcp(nz(m.KernelTCP))
            .set_swappiness(nz(m.Swappiness))
            .set_disable_oom_killer(nz(m.DisableOOMKiller));
        Ok(mem)
    })?)
    .set_cpu(msg_from("CPU", &r.CPU, |c| {
        let mut cpu = rt::LinuxCpu::default();
        cpu.set_shares(nz(c.Shares))
            .set_quota(nz(c.Quota))
            .set_period(nz(c.Period))
            .set_realtime_runtime(nz(c.RealtimeRuntime))
            .set_realtime_period(nz(c.RealtimePeriod))
            .set_cpus(opt_str(&c.Cpus))
            .set_mems(opt_str(&c.Mems));
        Ok(cpu)
    })?)
    .set_pids(msg_from("Pids", &r.Pids, |p| {
        let mut pids = rt::LinuxPids::default();
        pids.set_limit(p.Limit);
        Ok(pids)
    })?)
    .set_block_io(msg_from("BlockIO", &r.BlockIO, |b| {
        let mut blkio = rt::LinuxBlockIo::default();
        blkio
            .set_weight(weight("Weight", b.Weight)?)
            .set_leaf_weight(weight("LeafWeight", b.LeafWeight)?)
            .set_weight_device(list("WeightDevice", &b.WeightDevice, |d| {
                let mut dev = rt::LinuxWeightDeviceBuilder::default().major(d.Major).minor(d.Minor);
                if let Some(w) = weight("Weight", d.Weight)? {
                    dev = dev.weight(w);
                }
                if let Some(w) = weight("LeafWeight", d.LeafWeight)? {
                    dev = dev.leaf_weight(w);
                }
                built(dev.build())
            })?)
            .set_throttle_read_bps_device(list("ThrottleReadBpsDevice", &b.ThrottleReadBpsDevice, throttle_from_grpc)?)
            .set_throttle_write_bps_device(list(
                "ThrottleWriteBpsDevice",
                &b.ThrottleWriteBpsDevice,
                throttle_from_grpc,
            )?)
            .set_throttle_read_iops_device(list(
                "ThrottleReadIOPSDevice",
                &b.ThrottleReadIOPSDevice,
                throttle_from_grpc,
            )?)
            .set_throttle_write_iops_device(list(
                "ThrottleWriteIOPSDevice",
                &b.ThrottleWriteIOPSDevice,
                throttle_from_grpc,
            )?);
        Ok(blkio)
    })?)
    .set_hugepage_limits(list("HugepageLimits", &r.HugepageLimits, |h| {
        let mut limit = rt::LinuxHugepageLimit::default();
        limit.set_page_size(h.Pagesize.clone()).set_limit(fit("Limit", h.Limit)?);
        Ok(limit)
    })?)
    .set_network(msg_from("Network", &r.Network, |n| {
        let mut net = rt::LinuxNetwork::default();
        net.set_class_id(nz(n.ClassID)).set_priorities(list("Priorities", &n.Priorities, |p| {
            let mut prio = rt::LinuxInterfacePriority::default();
            prio.set_name(p.Name.clone()).set_priority(p.Priority);
            Ok(prio)
        })?);
        Ok(net)
    })?);
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Seccomp.

fn seccomp_to_grpc(s: &rt::LinuxSeccomp) -> grpc::LinuxSeccomp {
    grpc::LinuxSeccomp {
        DefaultAction: enum_str(&s.default_action()),
        Architectures: vec_of(s.architectures(), enum_str),
        Flags: vec_of(s.flags(), enum_str),
        Syscalls: vec_of(s.syscalls(), |c| grpc::LinuxSyscall {
            Names: c.names().clone(),
            Action: enum_str(&c.action()),
            ErrnoRet: c.errno_ret().map(grpc::linux_syscall::ErrnoRet::Errnoret),
            Args: vec_of(c.args(), |a| grpc::LinuxSeccompArg {
                Index: a.index() as u64,
                Value: a.value(),
                ValueTwo: z(a.value_two()),
                Op: enum_str(&a.op()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn seccomp_from_grpc(s: &grpc::LinuxSeccomp) -> Result<rt::LinuxSeccomp> {
    let mut out = rt::LinuxSeccomp::default();
    out.set_default_action(parse("DefaultAction", &s.DefaultAction)?)
        .set_architectures(enum_list("Architectures", &s.Architectures)?)
        .set_flags(enum_list("Flags", &s.Flags)?)
        .set_syscalls(list("Syscalls", &s.Syscalls, |c| {
            let mut syscall = rt::LinuxSyscall::default();
            syscall
                .set_names(c.Names.clone())
                .set_action(parse("Action", &c.Action)?)
                .set_errno_ret(c.has_errnoret().then(|| c.errnoret()))
                .set_args(list("Args", &c.Args, |a| {
                    let op: rt::LinuxSeccompOperator = parse("Op", &a.Op)?;
                    let index: usize = fit("Index", a.Index)?;
                    let mut arg = rt::LinuxSeccompArgBuilder::default().index(index).value(a.Value);
                    if let Some(v) = nz(a.ValueTwo) {
                        arg = arg.value_two(v);
                    }
                    built(arg.op(op).build())
                })?);
            Ok(syscall)
        })?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    /// containerd's `ctr oci spec` default plus the parts a Kubernetes pod adds.
    const CONFIG_JSON: &str = r#"{
      "ociVersion": "1.1.0",
      "process": {
        "terminal": true,
        "consoleSize": { "height": 40, "width": 120 },
        "user": { "uid": 1000, "gid": 1000, "umask": 18, "additionalGids": [10, 1000], "username": "app" },
        "args": ["/bin/sh", "-c", "exec nginx -g 'daemon off;'"],
        "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=web"],
        "cwd": "/srv",
        "capabilities": {
          "bounding": ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
            "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"],
          "effective": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
          "permitted": ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"],
          "inheritable": [],
          "ambient": ["CAP_NET_BIND_SERVICE"]
        },
        "rlimits": [
          { "type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1024 },
          { "type": "RLIMIT_CORE", "hard": 0, "soft": 0 }
        ],
        "noNewPrivileges": true,
        "apparmorProfile": "cri-containerd.apparmor.d",
        "oomScoreAdj": -998,
        "selinuxLabel": "system_u:system_r:container_t:s0:c1,c2"
      },
      "root": { "path": "rootfs", "readonly": true },
      "hostname": "web",
      "mounts": [
        { "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
        { "destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"] },
        { "destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
        { "destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"] },
        { "destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"] },
        { "destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"] },
        { "destination": "/etc/hosts", "type": "bind", "source": "/run/kata/shared/hosts", "options": ["rbind", "rprivate", "rw"] },
        { "destination": "/tmp/scratch" }
      ],
      "hooks": {
        "prestart": [{ "path": "/usr/bin/netns-setup", "args": ["netns-setup", "--pid"] }],
        "createRuntime": [{ "path": "/usr/libexec/oci/hooks.d/nvidia", "env": ["DEBUG=1"], "timeout": 10 }],
        "poststop": [{ "path": "/bin/cleanup" }]
      },
      "annotations": {
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "8c1d0f5b",
        "io.katacontainers.config.hypervisor.default_vcpus": "2"
      },
      "linux": {
        "uidMappings": [{ "containerID": 0, "hostID": 100000, "size": 65536 }],
        "gidMappings": [{ "containerID": 0, "hostID": 100000, "size": 65536 }],
        "sysctl": { "net.ipv4.ip_forward": "1", "kernel.shm_rmid_forced": "1" },
        "resources": {
          "devices": [
            { "allow": false, "access": "rwm" },
            { "allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm" },
            { "allow": true, "type": "b", "major": 8, "access": "r" }
          ],
          "memory": { "limit": 536870912, "reservation": 268435456, "swap": -1, "kernelTCP": 1048576, "swappiness": 60, "disableOOMKiller": true },
          "cpu": { "shares": 512, "quota": 50000, "period": 100000, "realtimeRuntime": 950, "realtimePeriod": 1000, "cpus": "0-1", "mems": "0" },
          "pids": { "limit": 4096 },
          "blockIO": {
            "weight": 500, "leafWeight": 300,
            "weightDevice": [{ "major": 8, "minor": 0, "weight": 600 }],
            "throttleReadBpsDevice": [{ "major": 8, "minor": 0, "rate": 104857600 }],
            "throttleWriteIOPSDevice": [{ "major": 8, "minor": 16, "rate": 1000 }]
          },
          "hugepageLimits": [{ "pageSize": "2MB", "limit": 209715200 }],
          "network": { "classID": 1048577, "priorities": [{ "name": "eth0", "priority": 5 }] }
        },
        "cgroupsPath": "/kubepods/burstable/pod1234/8c1d0f5b",
        "namespaces": [
          { "type": "pid" },
          { "type": "network", "path": "/var/run/netns/cni-3f2a" },
          { "type": "ipc" },
          { "type": "uts" },
          { "type": "mount" },
          { "type": "user" },
          { "type": "cgroup" }
        ],
        "devices": [
          { "path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0 },
          { "path": "/dev/sda", "type": "b", "major": 8, "minor": 0, "fileMode": 432, "uid": 0, "gid": 6 }
        ],
        "seccomp": {
          "defaultAction": "SCMP_ACT_ERRNO",
          "defaultErrnoRet": 38,
          "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
          "flags": ["SECCOMP_FILTER_FLAG_LOG"],
          "syscalls": [
            { "names": ["accept", "read", "write", "exit_group"], "action": "SCMP_ACT_ALLOW" },
            { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
              "args": [{ "index": 0, "value": 0, "op": "SCMP_CMP_EQ" }, { "index": 0, "value": 8, "op": "SCMP_CMP_EQ" }] },
            { "names": ["clone"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
              "args": [{ "index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ" }] },
            { "names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 0 },
            { "names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 97,
              "args": [{ "index": 0, "value": 16, "valueTwo": 4294967295, "op": "SCMP_CMP_MASKED_EQ" }] }
          ]
        },
        "rootfsPropagation": "rslave",
        "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
        "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        "mountLabel": "system_u:object_r:container_file_t:s0:c1,c2",
        "intelRdt": { "l3CacheSchema": "L3:0=ffff0;1=3ff" }
      }
    }"#;

    fn config() -> rt::Spec {
        serde_json::from_str(CONFIG_JSON).expect("config.json parses")
    }

    fn wire_round_trip(spec: &grpc::Spec) -> grpc::Spec {
        let bytes = spec.write_to_bytes().expect("serialize");
        grpc::Spec::parse_from_bytes(&bytes).expect("parse")
    }

    /// The documented losses that `CONFIG_JSON` exercises, applied by hand.
    fn normalize(spec: &mut rt::Spec) {
        let process = spec.process_mut().as_mut().unwrap();
        process.user_mut().set_umask(None); // not in oci.proto
        let mut caps = process.capabilities().clone().unwrap();
        caps.set_inheritable(None); // empty set -> None
        process.set_capabilities(Some(caps));
        let linux = spec.linux_mut().as_mut().unwrap();
        let devices = linux.devices_mut().as_mut().unwrap();
        for dev in devices.iter_mut() {
            dev.set_uid(dev.uid().filter(|&v| v != 0)); // uid/gid 0 -> None
            dev.set_gid(dev.gid().filter(|&v| v != 0));
        }
        let mut seccomp = linux.seccomp().clone().unwrap();
        seccomp.set_default_errno_ret(None); // not in oci.proto
        let mut syscalls = seccomp.syscalls().clone().unwrap();
        let clone = &mut syscalls[2];
        let args: Vec<_> = clone.args().clone().unwrap();
        let mut arg = rt::LinuxSeccompArgBuilder::default().index(args[0].index()).value(args[0].value());
        arg = arg.op(args[0].op()); // valueTwo 0 -> None
        clone.set_args(Some(vec![arg.build().unwrap()]));
        seccomp.set_syscalls(Some(syscalls));
        linux.set_seccomp(Some(seccomp));
    }

    #[test]
    fn config_json_round_trips_through_protobuf() {
        let original = config();
        let grpc = wire_round_trip(&spec_to_grpc(&original));
        let back = spec_from_grpc(&grpc).expect("converts back");
        let mut expected = original.clone();
        normalize(&mut expected);
        assert_ne!(original, expected, "normalization must change something");
        assert_eq!(back, expected);
        // And the result is a fixed point of the conversion.
        assert_eq!(spec_from_grpc(&wire_round_trip(&spec_to_grpc(&back))).unwrap(), back);
        assert_eq!(spec_to_grpc(&back), grpc);
    }

    #[test]
    fn grpc_fields_use_oci_json_spellings() {
        let g = spec_to_grpc(&config());
        assert_eq!(g.Version, "1.1.0");
        let p = g.Process.as_ref().unwrap();
        assert_eq!(p.Args, ["/bin/sh", "-c", "exec nginx -g 'daemon off;'"]);
        assert_eq!(p.Cwd, "/srv");
        assert_eq!((p.ConsoleSize.Height, p.ConsoleSize.Width), (40, 120));
        assert_eq!((p.User.UID, p.User.GID, p.User.AdditionalGids.as_slice()), (1000, 1000, &[10, 1000][..]));
        assert_eq!(p.OOMScoreAdj, -998);
        let caps = p.Capabilities.as_ref().unwrap();
        assert_eq!(caps.Bounding.len(), 14);
        assert!(caps.Bounding.contains(&"CAP_NET_BIND_SERVICE".to_string()));
        assert!(caps.Bounding.windows(2).all(|w| w[0] < w[1]), "sorted: {:?}", caps.Bounding);
        assert_eq!(caps.Effective, ["CAP_CHOWN", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        assert!(caps.Inheritable.is_empty());
        assert_eq!(p.Rlimits[0].Type, "RLIMIT_NOFILE");
        assert_eq!((p.Rlimits[0].Hard, p.Rlimits[0].Soft), (1048576, 1024));
        assert_eq!(g.Mounts[7].type_, "bind");
        assert_eq!(g.Mounts[8].source, "");
        assert_eq!(g.Hooks.CreateRuntime[0].Timeout, 10);
        assert_eq!(g.Hooks.Prestart[0].Args, ["netns-setup", "--pid"]);
        assert_eq!(g.Annotations["io.kubernetes.cri.container-type"], "container");

        let l = g.Linux.as_ref().unwrap();
        let types: Vec<&str> = l.Namespaces.iter().map(|n| n.Type.as_str()).collect();
        assert_eq!(types, ["pid", "network", "ipc", "uts", "mount", "user", "cgroup"]);
        assert_eq!(l.Namespaces[1].Path, "/var/run/netns/cni-3f2a");
        assert_eq!(l.UIDMappings[0].HostID, 100000);
        assert_eq!((l.Devices[0].Type.as_str(), l.Devices[1].Type.as_str()), ("c", "b"));
        assert_eq!(l.Devices[0].FileMode, 0o666);
        let r = l.Resources.as_ref().unwrap();
        assert_eq!((r.Devices[0].Type.as_str(), r.Devices[0].Major), ("", 0));
        assert_eq!((r.Devices[1].Type.as_str(), r.Devices[1].Minor), ("c", 229));
        assert_eq!((r.Memory.Limit, r.Memory.Swap, r.Memory.Kernel), (536870912, -1, 0));
        assert!(r.Memory.DisableOOMKiller);
        assert_eq!((r.CPU.Quota, r.CPU.Period, r.CPU.Cpus.as_str()), (50000, 100000, "0-1"));
        assert_eq!(r.Pids.Limit, 4096);
        assert_eq!((r.BlockIO.Weight, r.BlockIO.WeightDevice[0].LeafWeight), (500, 0));
        assert_eq!(r.BlockIO.ThrottleWriteIOPSDevice[0].Rate, 1000);
        assert_eq!(r.HugepageLimits[0].Pagesize, "2MB");
        assert_eq!(r.Network.Priorities[0].Name, "eth0");
        let s = l.Seccomp.as_ref().unwrap();
        assert_eq!(s.DefaultAction, "SCMP_ACT_ERRNO");
        assert_eq!(s.Architectures, ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]);
        assert_eq!(s.Flags, ["SECCOMP_FILTER_FLAG_LOG"]);
        assert_eq!(s.Syscalls[0].Action, "SCMP_ACT_ALLOW");
        assert!(!s.Syscalls[0].has_errnoret());
        assert_eq!((s.Syscalls[2].errnoret(), s.Syscalls[2].Args[0].Op.as_str()), (1, "SCMP_CMP_MASKED_EQ"));
        assert!(s.Syscalls[3].has_errnoret() && s.Syscalls[3].errnoret() == 0);
        assert_eq!(s.Syscalls[4].Args[0].ValueTwo, 4294967295);
        assert_eq!(l.RootfsPropagation, "rslave");
        assert_eq!(l.IntelRdt.L3CacheSchema, "L3:0=ffff0;1=3ff");
        assert!(g.Solaris.is_none() && g.Windows.is_none());
    }

    #[test]
    fn zero_values_come_back_as_none() {
        let mut g = spec_to_grpc(&config());
        let r = g.Linux.as_mut().unwrap().Resources.as_mut().unwrap();
        r.Memory.as_mut().unwrap().Limit = 0;
        r.CPU.as_mut().unwrap().Cpus.clear();
        g.Process.as_mut().unwrap().Terminal = false;
        g.Process.as_mut().unwrap().OOMScoreAdj = 0;
        g.Hostname.clear();
        let back = spec_from_grpc(&g).unwrap();
        let res = back.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(res.memory().unwrap().limit(), None);
        assert_eq!(res.memory().unwrap().swap(), Some(-1));
        assert_eq!(res.memory().unwrap().kernel(), None);
        assert_eq!(res.cpu().as_ref().unwrap().cpus(), &None);
        let process = back.process().as_ref().unwrap();
        assert_eq!((process.terminal(), process.oom_score_adj()), (None, None));
        assert_eq!(back.hostname(), &None);
        // An empty message keeps its presence; absent messages stay absent.
        let empty = grpc::Spec { Linux: MessageField::some(grpc::Linux::default()), ..Default::default() };
        let back = spec_from_grpc(&wire_round_trip(&empty)).unwrap();
        assert_eq!(back.linux().as_ref().unwrap().namespaces(), &None);
        assert!(back.process().is_none() && back.root().is_none() && back.mounts().is_none());
    }

    /// Two guest-spec rules this module owns (see the owner lists of the shim's and the
    /// agent's spec modules): an explicit `noNewPrivileges: false` (libcontainer 0.7 would skip
    /// seccomp with it) and zero realtime CPU settings (cgroup v2 has none) arrive as absent.
    #[test]
    fn false_no_new_privileges_and_zero_realtime_arrive_absent() {
        let mut spec = config();
        spec.process_mut().as_mut().unwrap().set_no_new_privileges(Some(false));
        let linux = spec.linux_mut().as_mut().unwrap();
        let cpu = linux.resources_mut().as_mut().unwrap().cpu_mut().as_mut().unwrap();
        cpu.set_realtime_runtime(Some(0)).set_realtime_period(Some(0));
        let back = spec_from_grpc(&wire_round_trip(&spec_to_grpc(&spec))).unwrap();
        assert_eq!(back.process().as_ref().unwrap().no_new_privileges(), None);
        let cpu = back.linux().as_ref().unwrap().resources().as_ref().unwrap().cpu().clone().unwrap();
        assert_eq!((cpu.realtime_runtime(), cpu.realtime_period()), (None, None));
        let process = process_from_grpc(spec_to_grpc(&spec).Process.as_ref().unwrap()).unwrap();
        assert_eq!(&process, back.process().as_ref().unwrap(), "an exec's process converts as the spec's");
    }

    #[test]
    fn invalid_grpc_values_name_the_field() {
        let good = spec_to_grpc(&config());
        let err = |edit: &dyn Fn(&mut grpc::Spec)| {
            let mut g = good.clone();
            edit(&mut g);
            spec_from_grpc(&g).expect_err("must be rejected")
        };
        let e = err(&|g| g.Linux.as_mut().unwrap().Namespaces[1].Type = "bogus".into());
        assert_eq!((e.field(), e.value()), ("Linux.Namespaces[1].Type", "bogus"));
        assert_eq!(e.to_string(), "Linux.Namespaces[1].Type: invalid value \"bogus\"");
        let e = err(&|g| {
            let caps = g.Process.as_mut().unwrap().Capabilities.as_mut().unwrap();
            caps.Bounding[3] = "CAP_NOPE".into();
        });
        assert_eq!((e.field(), e.value()), ("Process.Capabilities.Bounding[3]", "CAP_NOPE"));
        let e = err(&|g| g.Process.as_mut().unwrap().OOMScoreAdj = i64::MAX);
        assert!(matches!(e, ConvertError::OutOfRange { .. }), "{e}");
        assert_eq!(e.field(), "Process.OOMScoreAdj");
        let e = err(&|g| {
            let s = g.Linux.as_mut().unwrap().Seccomp.as_mut().unwrap();
            s.Syscalls[2].Args[0].Op = "SCMP_CMP_ALMOST".into();
        });
        assert_eq!(e.field(), "Linux.Seccomp.Syscalls[2].Args[0].Op");
        let e = err(&|g| g.Linux.as_mut().unwrap().Devices[1].Type = "x".into());
        assert_eq!(e.field(), "Linux.Devices[1].Type");
        let e = err(&|g| {
            let r = g.Linux.as_mut().unwrap().Resources.as_mut().unwrap();
            r.BlockIO.as_mut().unwrap().WeightDevice[0].Weight = 70000;
        });
        assert_eq!((e.field(), e.value()), ("Linux.Resources.BlockIO.WeightDevice[0].Weight", "70000"));
        let e = err(&|g| g.Process.as_mut().unwrap().Rlimits[1].Type = "RLIMIT_BOGUS".into());
        assert_eq!(e.field(), "Process.Rlimits[1].Type");
        let e = err(&|g| g.Linux.as_mut().unwrap().Seccomp.as_mut().unwrap().DefaultAction.clear());
        assert_eq!(e.field(), "Linux.Seccomp.DefaultAction");
    }

    #[test]
    fn accepts_kata_rust_runtime_spellings() {
        let mut g = spec_to_grpc(&config());
        g.Linux.as_mut().unwrap().Namespaces[1].Type = "net".into();
        g.Process.as_mut().unwrap().Capabilities.as_mut().unwrap().Ambient = vec!["NET_BIND_SERVICE".into()];
        let back = spec_from_grpc(&g).unwrap();
        let ns = &back.linux().as_ref().unwrap().namespaces().as_ref().unwrap()[1];
        assert_eq!(ns.typ(), rt::LinuxNamespaceType::Network);
        let caps = back.process().as_ref().unwrap().capabilities().clone().unwrap();
        assert_eq!(caps.ambient(), &Some([rt::Capability::NetBindService].into_iter().collect()));
    }
}
