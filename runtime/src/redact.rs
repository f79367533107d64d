//! Redaction for `collect`: secrets and tokens never leave the node. Configuration keys whose
//! name looks secret lose their value; in any text, `key=value` pairs with such a key lose
//! theirs (kernel parameters, QEMU `-object secret,data=...`, logfmt journal lines).

/// The marker that replaces a value.
pub const REDACTED: &str = "<redacted>";

const SECRET_WORDS: &[&str] =
    &["token", "secret", "password", "passwd", "credential", "auth", "private", "apikey", "cert"];

/// `true` when a key names something secret. `key` counts only as a whole word part (`key`,
/// `api_key`, `tls-key`), not inside words such as `monkey` or `keyboard`.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|p| matches!(p, "key" | "keys" | "keyfile") || SECRET_WORDS.iter().any(|w| p.contains(w)))
}

/// Redacts a TOML document: values of secret-looking keys, and `key=value` pairs inside string
/// values. A document that does not parse is refused (its raw text could hold anything).
pub fn redact_toml(text: &str) -> Result<String, String> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| format!("not valid TOML ({e}); left out"))?;
    redact_table(&mut doc);
    toml::to_string(&doc).map_err(|e| e.to_string())
}

fn redact_table(t: &mut toml::Table) {
    for (k, v) in t.iter_mut() {
        if is_secret_key(k) && !matches!(v, toml::Value::Table(_)) {
            *v = toml::Value::String(REDACTED.into());
        } else {
            redact_value(v);
        }
    }
}

fn redact_value(v: &mut toml::Value) {
    match v {
        toml::Value::String(s) => *s = redact_text(s),
        toml::Value::Array(a) => a.iter_mut().for_each(redact_value),
        toml::Value::Table(t) => redact_table(t),
        _ => {}
    }
}

/// Replaces the value of every `key=value` (or `key: value` in JSON-ish text) whose key looks
/// secret. A value ends at whitespace, `,`, `;`, `&`, or a quote.
pub fn redact_text(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let mut start = i;
            while start > 0
                && (bytes[start - 1].is_ascii_alphanumeric() || matches!(bytes[start - 1], b'_' | b'-' | b'.'))
            {
                start -= 1;
            }
            let token_start = text[..start].rfind(|c: char| c.is_ascii_whitespace()).map_or(0, |p| p + 1);
            let secret_object_data = &text[start..i] == "data" && text[token_start..].starts_with("secret,");
            if start < i && (is_secret_key(&text[start..i]) || secret_object_data) {
                let mut end = i + 1;
                let quoted = end < bytes.len() && bytes[end] == b'"';
                if quoted {
                    end += 1;
                    while end < bytes.len() && bytes[end] != b'"' {
                        end += 1;
                    }
                    end = (end + 1).min(bytes.len());
                } else {
                    while end < bytes.len()
                        && !bytes[end].is_ascii_whitespace()
                        && !matches!(bytes[end], b',' | b';' | b'&' | b'\'' | b'"')
                    {
                        end += 1;
                    }
                }
                if end > i + 1 {
                    out.push_str(&text[copied..=i]);
                    out.push_str(REDACTED);
                    copied = end;
                    i = end;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_keys() {
        for k in [
            "token",
            "agent.token",
            "auth_token",
            "password",
            "tls-key",
            "key",
            "client_secret",
            "api_key",
            "cert_chain",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in ["kernel", "kernel_params", "monkey", "keyboard", "path", "enable_debug", "machine_type"] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn text_pairs_are_redacted() {
        assert_eq!(
            redact_text("agent.log=debug agent.token=s3cr3t quiet"),
            "agent.log=debug agent.token=<redacted> quiet"
        );
        assert_eq!(
            redact_text("-object secret,id=sec0,data=abc,format=raw -m 2G data=kept"),
            "-object secret,id=sec0,data=<redacted>,format=raw -m 2G data=kept"
        );
        assert_eq!(redact_text("password=\"a b c\" next"), "password=<redacted> next");
        assert_eq!(redact_text("x=1 passwd=hunter2,y=2"), "x=1 passwd=<redacted>,y=2");
        assert_eq!(redact_text("nothing here = fine"), "nothing here = fine");
    }

    #[test]
    fn toml_keys_and_embedded_pairs_are_redacted() {
        let src = r#"
[hypervisor.qemu]
path = "/usr/bin/qemu-system-x86_64"
kernel_params = "agent.log=debug agent.token=abc123"
[agent.kata]
enable_debug = true
[image]
registry_password = "hunter2"
auth = { user = "u", token = "t0k" }
"#;
        let out = redact_toml(src).unwrap();
        assert!(!out.contains("hunter2") && !out.contains("abc123") && !out.contains("t0k"), "{out}");
        assert!(out.contains("/usr/bin/qemu-system-x86_64") && out.contains("agent.log=debug"), "{out}");
        assert!(out.contains(REDACTED));
        assert!(redact_toml("not = [toml").unwrap_err().contains("left out"));
    }
}
