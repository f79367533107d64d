//! Registry credentials for a guest pull: the pull's own ([`super::AUTH_METADATA_KEY`] in the
//! storage metadata: a docker config JSON or `user:password`), else the guest's auth file
//! (`agent.image_registry_auth=file:///...`, a docker config / containers auth.json), else
//! anonymous. Entries are looked up by the image's registry (`host[:port]`); Docker Hub also
//! under its historical keys.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;

/// The credentials of one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

impl Credentials {
    pub fn registry_auth(c: Option<&Credentials>) -> RegistryAuth {
        match c {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }
}

#[derive(serde::Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
}

#[derive(serde::Deserialize)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The keys a registry's entry may have in a docker config.
fn keys_for(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_string(), format!("https://{registry}"), format!("http://{registry}")];
    if matches!(registry, "docker.io" | "index.docker.io" | "registry-1.docker.io") {
        keys.extend(
            ["docker.io", "index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io"].map(String::from),
        );
    }
    keys
}

/// Finds `registry` in a docker config JSON (`{"auths":{...}}`); `what` names the source in
/// errors. Never puts a secret in an error.
pub fn from_docker_config(json: &str, registry: &str, what: &str) -> Result<Option<Credentials>, String> {
    let cfg: DockerConfig = serde_json::from_str(json)
        .map_err(|e| format!("{what}: not a docker config JSON ({{\"auths\":{{\"host:port\":{{\"auth\":\"<base64 user:password>\"}}}}}}): {e}"))?;
    let Some(entry) = keys_for(registry).iter().find_map(|k| cfg.auths.get(k)) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(Credentials { username: u.clone(), password: p.clone() }));
    }
    let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) else {
        return Err(format!("{what}: the entry of {registry} has neither \"auth\" nor \"username\"/\"password\""));
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| format!("{what}: the \"auth\" of {registry} is not base64 of user:password"))?;
    let (u, p) = decoded
        .split_once(':')
        .ok_or_else(|| format!("{what}: the \"auth\" of {registry} does not decode to user:password"))?;
    Ok(Some(Credentials { username: u.to_string(), password: p.to_string() }))
}

/// The credentials for pulling `image`, from the metadata, else the auth file, else none.
pub fn credentials_for(
    image: &str,
    metadata: &HashMap<String, String>,
    auth_file: Option<&Path>,
) -> Result<Option<Credentials>, String> {
    let reference: Reference = image.parse().map_err(|e| format!("{image:?} is not an image reference: {e}"))?;
    let registry = reference.resolve_registry().to_string();
    if let Some(v) = metadata.get(super::AUTH_METADATA_KEY) {
        let what = format!("metadata {}", super::AUTH_METADATA_KEY);
        if v.trim_start().starts_with('{') {
            if let Some(c) = from_docker_config(v, &registry, &what)? {
                return Ok(Some(c));
            }
            // Holds no entry for this registry: fall through to the auth file.
        } else {
            let (u, p) =
                v.split_once(':').ok_or_else(|| format!("{what}: neither a docker config JSON nor user:password"))?;
            return Ok(Some(Credentials { username: u.to_string(), password: p.to_string() }));
        }
    }
    if let Some(path) = auth_file {
        let what = format!("agent.image_registry_auth file {}", path.display());
        let meta = std::fs::metadata(path).map_err(|e| format!("{what}: {e}"))?;
        if meta.len() > 1 << 20 {
            return Err(format!("{what}: {} bytes, more than 1 MiB", meta.len()));
        }
        let json = std::fs::read_to_string(path).map_err(|e| format!("{what}: {e}"))?;
        return from_docker_config(&json, &registry, &what);
    }
    Ok(None)
}
