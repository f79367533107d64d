//! Kata's metric names, checked: [`NameList`] is `tests/data/kata-metrics.txt` (every family of
//! Kata's metrics design with its type, label names, group and whether podvisor must export
//! it), and [`check`] parses a Prometheus text exposition (with the `prometheus-parse` crate)
//! and returns every family whose name, type or label set is not in the list, every line that
//! is not Prometheus text, and the required families that are absent.
//!
//! Label sets depend on who produced the text ([`Source`]): the agent's `GetMetrics` holds only
//! `kata_agent_*` and `kata_guest_*`; the shim's `/metrics` adds the hypervisor, virtiofsd and
//! shim groups, all without a sandbox label; kata-monitor adds its own `kata_monitor_*`
//! families and puts [`SANDBOX_LABELS`] on every sample of the per-sandbox groups.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use prometheus_parse::{LineInfo, Scrape, Value};

/// The list's text (`tests/data/kata-metrics.txt`).
pub const KATA_METRICS_LIST: &str = include_str!("../data/kata-metrics.txt");

/// The labels kata-monitor adds to each sample of a sandbox (Kata's `metrics.go`).
pub const SANDBOX_LABELS: [&str; 4] = ["sandbox_id", "cri_uid", "cri_name", "cri_namespace"];

/// The component a family is collected from and for (the design doc's sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The agent process in the guest.
    Agent,
    /// The guest OS (from the agent).
    Guest,
    /// QEMU's process.
    Hypervisor,
    /// virtiofsd's process.
    Virtiofsd,
    /// The shim process.
    Shim,
    /// kata-monitor itself.
    Monitor,
}

impl Group {
    fn parse(s: &str) -> Option<Group> {
        Some(match s {
            "agent" => Group::Agent,
            "guest" => Group::Guest,
            "hypervisor" => Group::Hypervisor,
            "virtiofsd" => Group::Virtiofsd,
            "shim" => Group::Shim,
            "monitor" => Group::Monitor,
            _ => return None,
        })
    }

    /// Whether the group's samples belong to one sandbox (kata-monitor labels them).
    pub fn per_sandbox(self) -> bool {
        self != Group::Monitor
    }
}

/// A family's type, as in its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`
    Counter,
    /// `gauge`
    Gauge,
    /// `histogram`
    Histogram,
    /// `summary`
    Summary,
    /// no (or an unknown) `# TYPE` line
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            _ => return None,
        })
    }

    fn of(v: &Value) -> Kind {
        match v {
            Value::Counter(_) => Kind::Counter,
            Value::Gauge(_) => Kind::Gauge,
            Value::Histogram(_) => Kind::Histogram,
            Value::Summary(_) => Kind::Summary,
            Value::Untyped(_) => Kind::Untyped,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
            Kind::Untyped => "untyped",
        })
    }
}

/// One family of the list.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The full metric family name.
    pub name: String,
    /// Its type.
    pub kind: Kind,
    /// Its own label names (without `le`/`quantile` and without [`SANDBOX_LABELS`]).
    pub labels: BTreeSet<String>,
    /// Whether podvisor must export it.
    pub required: bool,
    /// The component.
    pub group: Group,
    /// Where in Kata it comes from (the line's comment).
    pub source: String,
}

/// The list of Kata's metric families (`tests/data/kata-metrics.txt`).
#[derive(Debug, Clone)]
pub struct NameList {
    /// By name.
    pub families: BTreeMap<String, Listed>,
}

impl NameList {
    /// The list of `tests/data/kata-metrics.txt` (panics if the file is malformed, which its
    /// unit test catches).
    pub fn kata() -> NameList {
        NameList::parse(KATA_METRICS_LIST).unwrap_or_else(|e| panic!("tests/data/kata-metrics.txt: {e}"))
    }

    /// Parses the list format (see the file's header).
    pub fn parse(text: &str) -> Result<NameList, String> {
        let mut families = BTreeMap::new();
        let mut group = None;
        for (n, raw) in text.lines().enumerate() {
            let n = n + 1;
            let (body, comment) = raw.split_once('#').unwrap_or((raw, ""));
            let body = body.trim();
            if body.is_empty() {
                continue;
            }
            if let Some(g) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
                group = Some(Group::parse(g).ok_or_else(|| format!("line {n}: unknown group [{g}]"))?);
                continue;
            }
            let group = group.ok_or_else(|| format!("line {n}: family before any [group]"))?;
            let f: Vec<&str> = body.split_whitespace().collect();
            let [name, kind, labels, req] = f[..] else {
                return Err(format!("line {n}: want `name type labels required|optional`, got {body:?}"));
            };
            let kind = Kind::parse(kind).ok_or_else(|| format!("line {n}: unknown type {kind:?}"))?;
            let labels: BTreeSet<String> =
                if labels == "-" { BTreeSet::new() } else { labels.split(',').map(str::to_string).collect() };
            let required = match req {
                "required" => true,
                "optional" => false,
                other => return Err(format!("line {n}: {other:?} is neither required nor optional")),
            };
            if !name.starts_with("kata_") || labels.iter().any(|l| SANDBOX_LABELS.contains(&l.as_str())) {
                return Err(format!("line {n}: {name}: names start with kata_, sandbox labels are implied"));
            }
            if comment.trim().is_empty() {
                return Err(format!("line {n}: {name} does not say where in Kata it comes from"));
            }
            let listed =
                Listed { name: name.to_string(), kind, labels, required, group, source: comment.trim().to_string() };
            if families.insert(name.to_string(), listed).is_some() {
                return Err(format!("line {n}: {name} listed twice"));
            }
        }
        Ok(NameList { families })
    }
}

/// Who produced a text, which decides the groups and labels allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The agent's `GetMetrics`: agent and guest groups, no sandbox labels.
    Agent,
    /// The shim's `/metrics`: all groups but the monitor's, no sandbox labels.
    Shim,
    /// kata-monitor's `/metrics`: every group, [`SANDBOX_LABELS`] on the per-sandbox ones;
    /// `sandboxes` says whether sandboxes ran (their required families must then be there).
    Monitor {
        /// Whether at least one sandbox ran during the scrape.
        sandboxes: bool,
    },
}

impl Source {
    fn allows(self, g: Group) -> bool {
        match self {
            Source::Agent => matches!(g, Group::Agent | Group::Guest),
            Source::Shim => g != Group::Monitor,
            Source::Monitor { .. } => true,
        }
    }

    fn requires(self, g: Group) -> bool {
        match self {
            Source::Monitor { sandboxes } => sandboxes || g == Group::Monitor,
            _ => self.allows(g),
        }
    }
}

/// One family as found in a text.
#[derive(Debug, Clone)]
pub struct Family {
    /// Its type (from the parsed samples).
    pub kind: Kind,
    /// Every distinct label-name set of its samples (`le`/`quantile` removed).
    pub label_sets: BTreeSet<BTreeSet<String>>,
    /// How many samples (a histogram or summary counts once per label set).
    pub samples: usize,
}

/// Parses a Prometheus text exposition into families by name; `_sum`/`_count` of a histogram
/// or summary are folded into it. Errors name lines that are not Prometheus text, repeated
/// `# TYPE` lines and families split over the text.
pub fn families(text: &str) -> Result<BTreeMap<String, Family>, Vec<String>> {
    let mut errors = Vec::new();
    let mut typed = BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(why) = bad_line(line) {
            errors.push(format!("line {}: {why}: {line:?}", n + 1));
            continue;
        }
        match LineInfo::parse(line) {
            LineInfo::Type { metric_alias, metric_name, .. } => {
                let name = metric_alias.unwrap_or(metric_name);
                if !typed.insert(name.clone()) {
                    errors.push(format!("line {}: second # TYPE line for {name}", n + 1));
                }
            }
            _ => {}
        }
    }
    let scrape = match parse(text) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e);
            return Err(errors);
        }
    };
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    let compound: BTreeSet<String> = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, Value::Histogram(_) | Value::Summary(_)))
        .map(|s| s.metric.clone())
        .collect();
    for s in &scrape.samples {
        let mut name = s.metric.as_str();
        let mut kind = Kind::of(&s.value);
        if let Some(base) = name.strip_suffix("_sum").or_else(|| name.strip_suffix("_count")) {
            if compound.contains(base) {
                name = base;
                kind = out.get(base).map_or(Kind::Histogram, |f| f.kind);
                // Counted with the buckets; only the label set is checked.
                let f = out.entry(name.to_string()).or_insert(Family { kind, label_sets: BTreeSet::new(), samples: 0 });
                f.label_sets.insert(s.labels.keys().map(|k| k.to_string()).collect());
                continue;
            }
        }
        let f = out.entry(name.to_string()).or_insert(Family { kind, label_sets: BTreeSet::new(), samples: 0 });
        if matches!(kind, Kind::Histogram | Kind::Summary) {
            f.kind = kind;
        }
        f.label_sets.insert(s.labels.keys().map(|k| k.to_string()).collect());
        f.samples += 1;
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The text parsed by `prometheus-parse`.
pub fn parse(text: &str) -> Result<Scrape, String> {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).map_err(|e| format!("parsing Prometheus text: {e}"))
}

/// The values of `label` over the samples of family `name` (histogram and summary samples
/// included; `_sum`/`_count` are their own names).
pub fn label_values(scrape: &Scrape, name: &str, label: &str) -> BTreeSet<String> {
    scrape.samples.iter().filter(|s| s.metric == name).filter_map(|s| s.labels.get(label)).map(str::to_string).collect()
}

/// The value of the single sample of `name` whose labels include `labels`, as a number.
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .and_then(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// `text` without the samples of sandboxes other than `ids` (samples with a `sandbox_id`
/// label naming another sandbox): what a test checks when other pods run on the machine.
pub fn only_sandboxes(text: &str, ids: &[&str]) -> String {
    text.lines()
        .filter(|l| match LineInfo::parse(l) {
            LineInfo::Sample { labels: Some(labels), .. } => match labels.split_once("sandbox_id=\"") {
                Some((_, rest)) => ids.iter().any(|id| rest.starts_with(&format!("{id}\""))),
                None => true,
            },
            _ => true,
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// What [`check`] found; empty when the text matches the list.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Lines that are not Prometheus text, repeated `# TYPE` lines.
    pub malformed: Vec<String>,
    /// Families whose name is not in the list, or whose group this source must not export.
    pub unlisted: Vec<String>,
    /// Listed families with another type or label set.
    pub mismatched: Vec<String>,
    /// Required families this source must export and did not.
    pub absent: Vec<String>,
}

impl Report {
    /// Whether nothing was found.
    pub fn is_clean(&self) -> bool {
        self.malformed.is_empty() && self.unlisted.is_empty() && self.mismatched.is_empty() && self.absent.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (what, v) in [
            ("malformed", &self.malformed),
            ("not in Kata's list", &self.unlisted),
            ("type or labels differ from Kata's list", &self.mismatched),
            ("required but absent", &self.absent),
        ] {
            if !v.is_empty() {
                writeln!(f, "{what} ({}):", v.len())?;
                for l in v {
                    writeln!(f, "  {l}")?;
                }
            }
        }
        Ok(())
    }
}

fn fmt_set(s: &BTreeSet<String>) -> String {
    format!("{{{}}}", s.iter().map(String::as_str).collect::<Vec<_>>().join(","))
}

/// Checks `text` (produced by `source`) against `list`.
pub fn check(list: &NameList, text: &str, source: Source) -> Report {
    let mut r = Report::default();
    let found = match families(text) {
        Ok(f) => f,
        Err(e) => {
            r.malformed = e;
            // Check what parses anyway.
            families(&strip_bad_lines(text)).unwrap_or_default()
        }
    };
    for (name, fam) in &found {
        let Some(l) = list.families.get(name) else {
            r.unlisted.push(format!("{name} ({}, labels {})", fam.kind, label_sets(fam)));
            continue;
        };
        if !source.allows(l.group) {
            r.unlisted.push(format!("{name}: a {:?} family, not exported by {source:?}", l.group));
            continue;
        }
        if fam.kind != l.kind {
            r.mismatched.push(format!("{name}: type {} where Kata's is {} ({})", fam.kind, l.kind, l.source));
        }
        let mut want = l.labels.clone();
        if matches!(source, Source::Monitor { .. }) && l.group.per_sandbox() {
            want.extend(SANDBOX_LABELS.iter().map(|s| s.to_string()));
        }
        if fam.label_sets.iter().any(|s| *s != want) {
            r.mismatched.push(format!(
                "{name}: labels {} where Kata's are {} ({})",
                label_sets(fam),
                fmt_set(&want),
                l.source
            ));
        }
    }
    for (name, l) in &list.families {
        if l.required && source.requires(l.group) && !found.contains_key(name) {
            r.absent.push(format!("{name} ({:?}; {})", l.group, l.source));
        }
    }
    r
}

fn label_sets(f: &Family) -> String {
    f.label_sets.iter().map(fmt_set).collect::<Vec<_>>().join(" ")
}

/// Why a line is not Prometheus text (`prometheus-parse` skips such lines silently).
fn bad_line(line: &str) -> Option<&'static str> {
    match LineInfo::parse(line) {
        LineInfo::Ignored if !line.trim_start().starts_with('#') => Some("not Prometheus text"),
        LineInfo::Sample { value, timestamp, labels, .. } => {
            let v = value.to_ascii_lowercase();
            if labels.is_some_and(|l| !labels_well_formed(l)) {
                Some("labels are not name=\"value\" pairs")
            } else if !(v == "nan" || v == "+inf" || v == "-inf" || v.parse::<f64>().is_ok()) {
                Some("sample value is not a number")
            } else if timestamp.is_some_and(|t| t.parse::<i64>().is_err()) {
                Some("timestamp is not an integer")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether the text between a sample's braces is `name="value"` pairs separated by commas
/// (names `[a-zA-Z_][a-zA-Z0-9_]*`, values with `\\`, `\"` and `\n` escapes), as the
/// exposition format says; `prometheus-parse` splits on `,` and `=` and would take
/// `item=load1` or a stray space in a name without complaint.
fn labels_well_formed(s: &str) -> bool {
    let mut c = s.chars().peekable();
    loop {
        let mut name = String::new();
        while let Some(&ch) = c.peek() {
            if ch.is_ascii_alphanumeric() || ch == '_' {
                name.push(ch);
                c.next();
            } else {
                break;
            }
        }
        if name.is_empty() || name.starts_with(|ch: char| ch.is_ascii_digit()) {
            return false;
        }
        if c.next() != Some('=') || c.next() != Some('"') {
            return false;
        }
        loop {
            match c.next() {
                None => return false,
                Some('"') => break,
                Some('\\') => {
                    if !matches!(c.next(), Some('\\' | '"' | 'n')) {
                        return false;
                    }
                }
                Some(_) => {}
            }
        }
        match c.next() {
            None => return true,
            Some(',') if c.peek().is_none() => return true,
            Some(',') => {}
            Some(_) => return false,
        }
    }
}

fn strip_bad_lines(text: &str) -> String {
    let mut seen = BTreeSet::new();
    text.lines()
        .filter(|l| bad_line(l).is_none())
        .filter(|l| match LineInfo::parse(l) {
            LineInfo::Type { metric_name, .. } => seen.insert(metric_name),
            _ => true,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_covers_every_group() {
        let l = NameList::kata();
        for g in [Group::Agent, Group::Guest, Group::Hypervisor, Group::Virtiofsd, Group::Shim, Group::Monitor] {
            assert!(l.families.values().any(|f| f.group == g && f.required), "{g:?}");
        }
        // The families the issue's end-to-end test queries.
        for n in ["kata_hypervisor_fds", "kata_guest_meminfo", "kata_shim_agent_rpc_durations_histogram_milliseconds"] {
            assert!(l.families[n].required, "{n}");
        }
        assert_eq!(l.families["kata_guest_cpu_time"].labels, ["cpu", "item"].map(String::from).into());
        assert_eq!(l.families["kata_monitor_scrape_durations_histogram_milliseconds"].kind, Kind::Histogram);
    }

    #[test]
    fn list_format_errors_name_the_line() {
        assert!(NameList::parse("kata_x gauge - required # a").unwrap_err().contains("line 1"));
        assert!(NameList::parse("[agent]\nkata_x gauge - maybe # a").unwrap_err().contains("line 2"));
        assert!(NameList::parse("[agent]\nkata_x gauge -  required").unwrap_err().contains("where in Kata"));
        assert!(NameList::parse("[agent]\nkata_x gauge sandbox_id required # a").is_err());
        assert!(NameList::parse("[agent]\nkata_x gauge - required # a\nkata_x gauge - required # a").is_err());
    }

    const LIST: &str = "[guest]\nkata_guest_load gauge item required # t\n\
        kata_guest_diskstat gauge disk,item optional # t\n\
        [shim]\nkata_shim_agent_rpc_durations_histogram_milliseconds histogram action required # t\n\
        [monitor]\nkata_monitor_scrape_count counter - required # t\n";

    const SHIM_TEXT: &str = "# HELP kata_guest_load Guest system load.\n# TYPE kata_guest_load gauge\n\
        kata_guest_load{item=\"load1\"} 0.5\nkata_guest_load{item=\"load5\"} 0.1\n\
        # TYPE kata_shim_agent_rpc_durations_histogram_milliseconds histogram\n\
        kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action=\"grpc.CheckRequest\",le=\"1\"} 1\n\
        kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action=\"grpc.CheckRequest\",le=\"+Inf\"} 2\n\
        kata_shim_agent_rpc_durations_histogram_milliseconds_sum{action=\"grpc.CheckRequest\"} 3\n\
        kata_shim_agent_rpc_durations_histogram_milliseconds_count{action=\"grpc.CheckRequest\"} 2\n";

    #[test]
    fn a_matching_shim_text_is_clean() {
        let l = NameList::parse(LIST).unwrap();
        let r = check(&l, SHIM_TEXT, Source::Shim);
        assert!(r.is_clean(), "{r}");
        let f = families(SHIM_TEXT).unwrap();
        assert_eq!(f["kata_shim_agent_rpc_durations_histogram_milliseconds"].kind, Kind::Histogram);
        assert_eq!(f.len(), 2, "{f:?}");
    }

    #[test]
    fn unknown_names_labels_types_and_absences_are_reported() {
        let l = NameList::parse(LIST).unwrap();
        let text = format!(
            "{SHIM_TEXT}# TYPE kata_guest_made_up gauge\nkata_guest_made_up 1\n\
             # TYPE kata_guest_diskstat counter\nkata_guest_diskstat{{disk=\"vda\"}} 1\n"
        );
        let r = check(&l, &text, Source::Shim);
        assert!(r.unlisted.iter().any(|u| u.starts_with("kata_guest_made_up")), "{r}");
        assert!(r.mismatched.iter().any(|u| u.contains("type counter")), "{r}");
        assert!(r.mismatched.iter().any(|u| u.contains("labels {disk}")), "{r}");
        // The agent exports no shim family; the monitor's own are required of it.
        let r = check(&l, SHIM_TEXT, Source::Agent);
        assert!(r.unlisted.iter().any(|u| u.contains("not exported by Agent")), "{r}");
        let r = check(&l, "", Source::Monitor { sandboxes: false });
        assert_eq!(r.absent.len(), 1, "{r}");
        let r = check(&l, "", Source::Monitor { sandboxes: true });
        assert_eq!(r.absent.len(), 3, "{r}");
        // Shim text seen through the monitor lacks the sandbox labels.
        let r = check(&l, SHIM_TEXT, Source::Monitor { sandboxes: true });
        assert!(r.mismatched.iter().any(|u| u.contains("cri_name")), "{r}");
    }

    #[test]
    fn monitor_labels_are_accepted_and_garbage_is_malformed() {
        let l = NameList::parse(LIST).unwrap();
        let lab = "sandbox_id=\"a\",cri_uid=\"u\",cri_name=\"p\",cri_namespace=\"n\"";
        let text = format!(
            "# TYPE kata_monitor_scrape_count counter\nkata_monitor_scrape_count 3\n\
             # TYPE kata_guest_load gauge\nkata_guest_load{{item=\"load1\",{lab}}} 1\n\
             # TYPE kata_shim_agent_rpc_durations_histogram_milliseconds histogram\n\
             kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{{action=\"x\",le=\"+Inf\",{lab}}} 1\n\
             kata_shim_agent_rpc_durations_histogram_milliseconds_sum{{action=\"x\",{lab}}} 1\n\
             kata_shim_agent_rpc_durations_histogram_milliseconds_count{{action=\"x\",{lab}}} 1\n"
        );
        let r = check(&l, &text, Source::Monitor { sandboxes: true });
        assert!(r.is_clean(), "{r}");
        let s = parse(&text).unwrap();
        assert_eq!(label_values(&s, "kata_guest_load", "cri_name"), ["p".to_string()].into());
        assert_eq!(value(&s, "kata_monitor_scrape_count", &[]), Some(3.0));
        let other = text.replace("sandbox_id=\"a\"", "sandbox_id=\"b\"");
        assert_eq!(only_sandboxes(&other, &["a"]).lines().count(), 4, "{}", only_sandboxes(&other, &["a"]));
        assert_eq!(only_sandboxes(&other, &["b"]), other);
        assert!(labels_well_formed(r#"a="1",b_2="x,y=z \" \\",c="""#));
        assert!(labels_well_formed(r#"a="1","#));
        for bad in [r#"a=1"#, r#" a="1""#, r#"a="1" "#, r#"1a="1""#, r#"a="1"b="2""#, r#"a="\q""#, r#"a="1"#] {
            assert!(!labels_well_formed(bad), "{bad}");
        }
        let bad = format!("{text}this is not a sample\n# TYPE kata_monitor_scrape_count counter\n");
        let r = check(&l, &bad, Source::Monitor { sandboxes: true });
        assert_eq!(r.malformed.len(), 2, "{r}");
    }
}
