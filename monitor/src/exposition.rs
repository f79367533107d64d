//! The Prometheus text exposition format (version 0.0.4): a strict parser of one shim's answer
//! into metric families, and the merge of several shims' families into one valid exposition with
//! extra labels on every sample (`sandbox_id`, `cri_*`).
//!
//! A shim's answer is not trusted to be well formed: every line is parsed (names, label escapes,
//! float values, timestamps), families must be contiguous and may not repeat, and labels the
//! monitor adds may not be present already; any fault rejects the whole answer (a failed scrape)
//! rather than letting it corrupt the merged output. Prometheus requires all samples of a family
//! to follow its single `# TYPE` line, so the merge groups each family's samples from all shims.
//!
//! Written here rather than with `prometheus-parse`: that crate splits labels on `,` and `=`
//! without honouring quoting or escapes and types `_sum`/`_count` as untyped, so re-encoding its
//! output would not reproduce what the shim sent.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// A metric family's type (`# TYPE` line; `untyped` when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `counter`.
    Counter,
    /// `gauge`.
    Gauge,
    /// `histogram` (`_bucket{le}`, `_sum`, `_count` samples).
    Histogram,
    /// `summary` (`{quantile}`, `_sum`, `_count` samples).
    Summary,
    /// `untyped`.
    Untyped,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "summary" => Kind::Summary,
            "untyped" => Kind::Untyped,
            _ => return None,
        })
    }

    /// The word of the `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            Kind::Summary => "summary",
            Kind::Untyped => "untyped",
        }
    }

    /// Whether a sample named `sample` (with `labels`) belongs to the family `family` of this kind.
    fn owns(self, family: &str, sample: &str) -> bool {
        match self {
            Kind::Counter | Kind::Gauge | Kind::Untyped => sample == family,
            Kind::Histogram => {
                sample.strip_prefix(family).is_some_and(|suffix| matches!(suffix, "_bucket" | "_sum" | "_count"))
            }
            Kind::Summary => {
                sample == family
                    || sample.strip_prefix(family).is_some_and(|suffix| matches!(suffix, "_sum" | "_count"))
            }
        }
    }
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's metric name (`foo_bucket` for a histogram `foo`).
    pub name: String,
    /// Label names and (unescaped) values, in the order received.
    pub labels: Vec<(String, String)>,
    /// The value as received (validated to be a float: decimal, `NaN`, `+Inf`, `-Inf`).
    pub value: String,
    /// The optional timestamp (milliseconds since the epoch).
    pub timestamp: Option<i64>,
}

/// One metric family: its `# HELP` text (escaped as received), type and samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// The family name.
    pub name: String,
    /// The `# HELP` docstring, still escaped (`\\`, `\n`), as received.
    pub help: Option<String>,
    /// The `# TYPE`.
    pub kind: Kind,
    /// Its samples, in order.
    pub samples: Vec<Sample>,
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The end of the name starting `s` (metric name characters).
fn name_len(s: &str) -> usize {
    s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(s.len())
}

/// Label names and values.
type Labels = Vec<(String, String)>;

/// Parses the `{...}` label set at the start of `s`; returns the labels and the rest after `}`.
fn parse_labels(s: &str) -> Result<(Labels, &str), String> {
    let mut rest = s.strip_prefix('{').ok_or("expected {")?;
    let mut labels: Labels = Vec::new();
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let n = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let name = &rest[..n];
        if !is_label_name(name) {
            return Err(format!("bad label name at {:?}", truncate(rest)));
        }
        rest = rest[n..].trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('=').ok_or_else(|| format!("expected = after label {name}"))?;
        rest = rest.trim_start_matches([' ', '\t']);
        rest = rest.strip_prefix('"').ok_or_else(|| format!("expected \" after {name}="))?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {:?} in the value of label {name}", other.map(|c| c.1))),
                },
                Some((_, c)) => value.push(c),
            }
        };
        rest = &rest[end + 1..];
        if labels.iter().any(|(n, _)| n == name) {
            return Err(format!("label {name} twice"));
        }
        labels.push((name.to_string(), value));
        rest = rest.trim_start_matches([' ', '\t']);
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err(format!("expected , or }} after the value of label {name}"));
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn parse_value(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '+' | '-'))
        && (s.parse::<f64>().is_ok() || matches!(s, "NaN" | "+Inf" | "-Inf" | "Inf"));
    if ok {
        Ok(())
    } else {
        Err(format!("bad sample value {:?}", truncate(s)))
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let n = name_len(line);
    let name = &line[..n];
    if !is_metric_name(name) {
        return Err(format!("bad metric name at {:?}", truncate(line)));
    }
    let mut rest = line[n..].trim_start_matches([' ', '\t']);
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let (l, r) = parse_labels(rest)?;
        labels = l;
        rest = r;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields.next().ok_or_else(|| format!("sample {name} has no value"))?;
    parse_value(value)?;
    let timestamp = match fields.next() {
        None => None,
        Some(ts) => Some(ts.parse::<i64>().map_err(|_| format!("bad timestamp {:?} of {name}", truncate(ts)))?),
    };
    if fields.next().is_some() {
        return Err(format!("trailing text after the sample {name}"));
    }
    Ok(Sample { name: name.to_string(), labels, value: value.to_string(), timestamp })
}

fn check_help(doc: &str) -> Result<(), String> {
    let mut chars = doc.chars();
    while let Some(c) = chars.next() {
        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
            return Err(format!("bad escape in HELP text {:?}", truncate(doc)));
        }
    }
    Ok(())
}

/// Parses a whole exposition. Labels named in `reserved` may not appear (the caller adds them).
pub fn parse(text: &str, reserved: &[&str]) -> Result<Vec<Family>, String> {
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut current: Option<usize> = None;
    // The family `name`, created when new; an older, non-current one is a repeat.
    let mut family = |families: &mut Vec<Family>, current: &mut Option<usize>, name: &str| -> Result<usize, String> {
        match index.get(name) {
            Some(&i) if Some(i) == *current => Ok(i),
            Some(_) => Err(format!("metric family {name} appears twice, not contiguous")),
            None => {
                families.push(Family { name: name.to_string(), help: None, kind: Kind::Untyped, samples: Vec::new() });
                let i = families.len() - 1;
                index.insert(name.to_string(), i);
                *current = Some(i);
                Ok(i)
            }
        }
    };
    for (number, raw) in text.split('\n').enumerate() {
        let at = |e: String| format!("line {}: {e}", number + 1);
        let line = raw.trim_matches([' ', '\t', '\r']);
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start_matches([' ', '\t']);
            let (keyword, rest) = match comment.split_once([' ', '\t']) {
                Some((k @ ("HELP" | "TYPE"), rest)) => (k, rest.trim_start_matches([' ', '\t'])),
                _ => continue, // a plain comment
            };
            let n = name_len(rest);
            let name = &rest[..n];
            if !is_metric_name(name) {
                return Err(at(format!("bad metric name in # {keyword}")));
            }
            let arg = rest[n..].strip_prefix([' ', '\t']).unwrap_or(&rest[n..]);
            if !rest[n..].is_empty() && !rest[n..].starts_with([' ', '\t']) {
                return Err(at(format!("bad metric name in # {keyword}")));
            }
            let i = family(&mut families, &mut current, name).map_err(at)?;
            let f = &mut families[i];
            if keyword == "HELP" {
                if f.help.is_some() {
                    return Err(at(format!("second HELP for {name}")));
                }
                check_help(arg).map_err(at)?;
                f.help = Some(arg.to_string());
            } else {
                if !f.samples.is_empty() {
                    return Err(at(format!("TYPE for {name} after its samples")));
                }
                let kind = Kind::parse(arg.trim()).ok_or_else(|| at(format!("unknown TYPE {:?}", truncate(arg))))?;
                f.kind = kind;
            }
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        if let Some(label) = sample.labels.iter().find(|(n, _)| reserved.contains(&n.as_str())) {
            return Err(at(format!("label {} is reserved for kata-monitor", label.0)));
        }
        let i = match current {
            Some(i) if families[i].kind.owns(&families[i].name, &sample.name) => i,
            _ => family(&mut families, &mut current, &sample.name).map_err(at)?,
        };
        let f = &families[i];
        if f.kind == Kind::Histogram
            && sample.name.ends_with("_bucket")
            && !sample.labels.iter().any(|(n, _)| n == "le")
        {
            return Err(at(format!("bucket of histogram {} without le", f.name)));
        }
        families[i].samples.push(sample);
    }
    Ok(families)
}

/// Escapes a label value for the text format.
pub fn escape_label_value(out: &mut String, value: &str) {
    if !value.contains(['\\', '"', '\n']) {
        out.push_str(value);
        return;
    }
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn write_sample(out: &mut String, name: &str, suffix: &str, sample: &Sample, extra: &[(String, String)]) {
    out.push_str(name);
    out.push_str(suffix);
    out.push('{');
    for (i, (n, v)) in sample.labels.iter().chain(extra.iter()).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(n);
        out.push_str("=\"");
        escape_label_value(out, v);
        out.push('"');
    }
    out.push_str("} ");
    out.push_str(&sample.value);
    if let Some(ts) = sample.timestamp {
        let _ = write!(out, " {ts}");
    }
    out.push('\n');
}

struct Merged {
    help: Option<String>,
    kind: Kind,
    body: String,
}

/// Merges several sources' families into one exposition: each family once (`# HELP` and
/// `# TYPE` of the first source that has it), with the samples of every source carrying that
/// source's `extra` labels after their own. A family whose type differs from the first source's
/// is dropped from the later source (returned as a message).
#[derive(Default)]
pub struct Merger {
    families: BTreeMap<String, Merged>,
}

impl Merger {
    /// An empty merge.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one source's family, renamed to `name` (its samples keep their suffixes).
    pub fn add(&mut self, name: &str, family: &Family, extra: &[(String, String)]) -> Result<(), String> {
        let merged = self.families.entry(name.to_string()).or_insert_with(|| Merged {
            help: family.help.clone(),
            kind: family.kind,
            body: String::new(),
        });
        if merged.kind != family.kind {
            return Err(format!(
                "metric family {name} is a {} here but a {} in another sandbox",
                family.kind.as_str(),
                merged.kind.as_str()
            ));
        }
        for sample in &family.samples {
            let suffix = &sample.name[family.name.len()..];
            write_sample(&mut merged.body, name, suffix, sample, extra);
        }
        Ok(())
    }

    /// Writes the merged exposition, families in name order.
    pub fn write(&self, out: &mut String) {
        for (name, f) in &self.families {
            if f.body.is_empty() {
                continue;
            }
            if let Some(help) = &f.help {
                let _ = writeln!(out, "# HELP {name} {help}");
            }
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            out.push_str(&f.body);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIM: &str = r#"# HELP kata_hypervisor_fds Open FDs for hypervisor.
# TYPE kata_hypervisor_fds gauge
kata_hypervisor_fds 42
# HELP kata_shim_agent_rpc_durations_histogram_milliseconds RPC latency distributions.
# TYPE kata_shim_agent_rpc_durations_histogram_milliseconds histogram
kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action="create_container",le="1"} 0
kata_shim_agent_rpc_durations_histogram_milliseconds_bucket{action="create_container",le="+Inf"} 3
kata_shim_agent_rpc_durations_histogram_milliseconds_sum{action="create_container"} 12.5
kata_shim_agent_rpc_durations_histogram_milliseconds_count{action="create_container"} 3
# TYPE kata_guest_meminfo gauge
kata_guest_meminfo{item="mem_total"} 2.05e+09
kata_guest_meminfo { item = "odd \"quoted\", a\\b\nc" , } NaN 1700000000000
untyped_thing +Inf
"#;

    #[test]
    fn parses_families_samples_labels_and_escapes() {
        let f = parse(SHIM, &["sandbox_id"]).unwrap();
        let names: Vec<_> = f.iter().map(|f| (f.name.as_str(), f.kind, f.samples.len())).collect();
        assert_eq!(
            names,
            [
                ("kata_hypervisor_fds", Kind::Gauge, 1),
                ("kata_shim_agent_rpc_durations_histogram_milliseconds", Kind::Histogram, 4),
                ("kata_guest_meminfo", Kind::Gauge, 2),
                ("untyped_thing", Kind::Untyped, 1)
            ]
        );
        assert_eq!(f[0].help.as_deref(), Some("Open FDs for hypervisor."));
        let odd = &f[2].samples[1];
        assert_eq!(odd.labels, [("item".to_string(), "odd \"quoted\", a\\b\nc".to_string())]);
        assert_eq!((odd.value.as_str(), odd.timestamp), ("NaN", Some(1_700_000_000_000)));
    }

    #[test]
    fn merge_adds_labels_groups_families_and_round_trips() {
        let f = parse(SHIM, &[]).unwrap();
        let mut m = Merger::new();
        let a = [("sandbox_id".to_string(), "a".to_string()), ("cri_name".to_string(), "pod \"a\"".to_string())];
        let b = [("sandbox_id".to_string(), "b".to_string()), ("cri_name".to_string(), String::new())];
        for fam in &f {
            m.add(&fam.name, fam, &a).unwrap();
        }
        for fam in &f {
            m.add(&fam.name, fam, &b).unwrap();
        }
        let mut out = String::new();
        m.write(&mut out);
        assert_eq!(out.matches("# TYPE kata_hypervisor_fds gauge").count(), 1, "{out}");
        assert!(out.contains("kata_hypervisor_fds{sandbox_id=\"a\",cri_name=\"pod \\\"a\\\"\"} 42\n"), "{out}");
        assert!(out.contains("kata_hypervisor_fds{sandbox_id=\"b\",cri_name=\"\"} 42\n"), "{out}");
        assert!(out.contains(
            "kata_guest_meminfo{item=\"odd \\\"quoted\\\", a\\\\b\\nc\",sandbox_id=\"a\",cri_name=\"pod \\\"a\\\"\"} NaN 1700000000000\n"
        ));
        // The output parses again: families contiguous, one TYPE each, samples all there.
        let again = parse(&out, &[]).unwrap();
        assert_eq!(again.len(), 4);
        assert_eq!(again.iter().map(|f| f.samples.len()).sum::<usize>(), 16);
        let hist = again.iter().find(|f| f.kind == Kind::Histogram).unwrap();
        assert!(hist.samples.iter().all(|s| s.labels.iter().any(|(n, v)| n == "sandbox_id" && (v == "a" || v == "b"))));
    }

    #[test]
    fn merge_drops_a_family_of_another_type() {
        let mut m = Merger::new();
        let g = parse("# TYPE x gauge\nx 1\n", &[]).unwrap();
        let c = parse("# TYPE x counter\nx 2\n", &[]).unwrap();
        m.add("x", &g[0], &[]).unwrap();
        assert!(m.add("x", &c[0], &[]).unwrap_err().contains("counter here but a gauge"));
    }

    #[test]
    fn rejects_malformed_or_hostile_answers() {
        let cases = [
            ("x{a=\"1\"} 1\ny 2\nx 3\n", "appears twice"),
            ("x{sandbox_id=\"evil\"} 1\n", "reserved"),
            ("x{a=\"1} 1\n", "unterminated"),
            ("x{a=\"\\t\"} 1\n", "bad escape"),
            ("x{a=\"1\",a=\"2\"} 1\n", "label a twice"),
            ("x{1a=\"1\"} 1\n", "bad label name"),
            ("x one\n", "bad sample value"),
            ("x 1 2 3\n", "trailing text"),
            ("x 1 soon\n", "bad timestamp"),
            ("x\n", "no value"),
            ("9x 1\n", "bad metric name"),
            ("# TYPE x gauge\nx 1\n# TYPE x gauge\n", "TYPE for x after its samples"),
            ("# TYPE x histogram\nx_bucket 1\n", "without le"),
            ("# TYPE x fancy\n", "unknown TYPE"),
            ("# HELP x a\n# HELP x b\n", "second HELP"),
            ("# HELP x bad \\escape\n", "bad escape in HELP"),
        ];
        for (text, want) in cases {
            let err = parse(text, &["sandbox_id"]).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err} (wanted {want})");
        }
    }

    #[test]
    fn summary_and_plain_comments() {
        let f = parse(
            "# a comment\n# TYPE s summary\ns{quantile=\"0.5\"} 1\ns_sum 2\ns_count 3\n#TYPE t counter\nt 4\n",
            &[],
        )
        .unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!((f[0].kind, f[0].samples.len()), (Kind::Summary, 3));
        assert_eq!(f[1].kind, Kind::Counter);
    }
}
