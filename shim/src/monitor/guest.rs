//! The guest's answer to `GetMetrics`, which the shim does not trust: at most [`MAX_TEXT`]
//! bytes, parsed as Prometheus text (`prometheus-parse`), and rebuilt family by family so that
//! what leaves the shim is well-formed whatever came in. Only counter, gauge and untyped (as
//! gauge) families named `kata_agent_*` / `kata_guest_*` with valid metric and label names pass;
//! everything else is dropped and counted.

use std::collections::HashMap;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus_parse::{Scrape, Value};

/// Largest guest answer read at all (Kata's own agent answers about 130 KiB).
pub const MAX_TEXT: usize = 1024 * 1024;

/// Most samples kept from one answer (a 1 MiB answer of short lines has fewer than 40000).
const MAX_SAMPLES: usize = 20_000;

/// The families the guest may send.
const PREFIXES: [&str; 2] = ["kata_agent_", "kata_guest_"];

/// What came out of one guest answer.
#[derive(Debug, Default)]
pub struct GuestFamilies {
    /// The accepted families, in the order the guest sent their first sample.
    pub families: Vec<MetricFamily>,
    /// Samples dropped (wrong prefix, bad names, histogram/summary, type clash, over the cap).
    pub dropped: usize,
}

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    match chars.next() {
        Some(c) if ok_first(c) => chars.all(|c| ok_first(c) || c.is_ascii_digit()),
        _ => false,
    }
}

/// The Prometheus text of accepted families.
pub fn to_text(families: &[MetricFamily]) -> String {
    use prometheus::Encoder;
    let mut out = Vec::new();
    // Families built by `accept` are counters and gauges with at least one sample: the encoder
    // has nothing to refuse.
    let _ = prometheus::TextEncoder::new().encode(families, &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Parses and filters the guest's text. Text over [`MAX_TEXT`] is refused whole.
pub fn accept(text: &str) -> Result<GuestFamilies, String> {
    if text.len() > MAX_TEXT {
        return Err(format!("the guest's metrics are {} bytes, over the {MAX_TEXT}-byte limit", text.len()));
    }
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| format!("the guest's metrics do not parse: {e}"))?;
    let mut out = GuestFamilies::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut kept = 0usize;
    for sample in scrape.samples {
        let (kind, value) = match sample.value {
            Value::Counter(v) => (MetricType::COUNTER, v),
            Value::Gauge(v) => (MetricType::GAUGE, v),
            // The encoder has no untyped form; Prometheus reads untyped as a gauge anyway.
            Value::Untyped(v) => (MetricType::GAUGE, v),
            Value::Histogram(_) | Value::Summary(_) => {
                out.dropped += 1;
                continue;
            }
        };
        let name = sample.metric;
        let labels_ok = sample.labels.keys().all(|k| valid_name(k, false) && !k.starts_with("__"));
        if kept >= MAX_SAMPLES
            || !PREFIXES.iter().any(|p| name.starts_with(p))
            || !valid_name(&name, true)
            || !labels_ok
        {
            out.dropped += 1;
            continue;
        }
        let at = match index.get(&name) {
            Some(&i) => i,
            None => {
                let mut family = MetricFamily::default();
                family.set_name(name.clone());
                if let Some(help) = scrape.docs.get(&name) {
                    family.set_help(help.chars().take(1024).collect());
                }
                family.set_field_type(kind);
                out.families.push(family);
                index.insert(name.clone(), out.families.len() - 1);
                out.families.len() - 1
            }
        };
        let family = &mut out.families[at];
        if family.get_field_type() != kind {
            out.dropped += 1;
            continue;
        }
        let mut names: Vec<(&String, &String)> = sample.labels.iter().collect();
        names.sort();
        let mut metric = Metric::default();
        metric.set_label(
            names
                .into_iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name(k.clone());
                    l.set_value(v.clone());
                    l
                })
                .collect(),
        );
        match kind {
            MetricType::COUNTER => {
                let mut c = Counter::default();
                c.set_value(value);
                metric.set_counter(c);
            }
            _ => {
                let mut g = Gauge::default();
                g.set_value(value);
                metric.set_gauge(g);
            }
        }
        family.mut_metric().push(metric);
        kept += 1;
    }
    Ok(out)
}
