//! Kata's agent policy: a Rego document (package `agent_policy`) that allows or blocks every
//! AgentService request, evaluated in the guest with Microsoft's `regorus` interpreter.
//!
//! Semantics follow Kata's agent:
//! * No policy set: every request is allowed.
//! * `SetPolicy` loads a policy, replacing the previous one. Once a policy is set, `SetPolicy`
//!   itself is a request like the others (`data.agent_policy.SetPolicyRequest`).
//! * Each AgentService request is checked before its handler runs (the [`Gate`] wrapping every
//!   registered method): `data.agent_policy.<request message name>` is evaluated with the
//!   request as `input`, e.g. `ExecProcessRequest`, `ReadStreamRequest` (ReadStdout and
//!   ReadStderr), `GuestDetailsRequest`. `true`, or an object whose `allowed` is `true` (the
//!   form genpolicy's rules return), allows it; `false`, undefined (no rule and no `default`)
//!   or an evaluation error blocks it with ttrpc PERMISSION_DENIED naming the RPC.
//! * `default AllowRequestsFailingPolicy := true` in the policy logs blocked requests and lets
//!   them through (Kata's debugging switch).
//! * Policies are parsed as Rego v0 (with `future.keywords` imports), like Kata's policies
//!   (genpolicy's `rules.rego`); `import rego.v1` switches a policy to v1.
//!
//! `input` is the request as Kata's agent serializes it (serde of the rust-protobuf structs):
//! every field of the message under its `.proto` name (a Rust keyword gets a `_` suffix:
//! `type_`), unset message fields and unset `optional` fields as `null`, 64-bit integers as
//! numbers, enums as their numbers, `bytes` as arrays of numbers, maps as objects. For example
//! `input.process.Args`, `input.OCI.Mounts[0].type_`, `input.container_id`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use protobuf::reflect::{MessageDescriptor, ReflectFieldRef, ReflectValueRef};
use protobuf::MessageDyn;
use serde_json::{Map, Value as Json};
use slog::{info, warn, Logger};
use ttrpc::asynchronous::{MethodHandler, Service, TtrpcContext};
use ttrpc::{Code, Request, Response};

/// The Rego package every agent policy declares.
const PACKAGE: &str = "agent_policy";

/// The policy's debugging switch (Kata): blocked requests are logged and allowed.
const ALLOW_FAILURES_RULE: &str = "AllowRequestsFailingPolicy";

/// Longest one evaluation may run; past it the request is blocked.
const EVAL_LIMIT: Duration = Duration::from_secs(5);

/// Most characters of the policy's `print` output carried in a denial message.
const PRINTS_MAX: usize = 2048;

/// A loaded policy.
struct Loaded {
    engine: regorus::Engine,
    allow_failures: bool,
}

/// The agent's policy: none until `SetPolicy`.
pub struct AgentPolicy {
    log: Logger,
    loaded: Mutex<Option<Loaded>>,
}

/// A fresh engine with the agent's settings.
fn new_engine() -> regorus::Engine {
    let mut engine = regorus::Engine::new();
    // Kata's policies (genpolicy, kata-opa samples) are Rego v0 with future keywords.
    engine.set_rego_v0(true);
    // A failing builtin (e.g. a bad regex in data) makes its expression undefined, as in OPA.
    engine.set_strict_builtin_errors(false);
    engine.set_gather_prints(true);
    // genpolicy output has long lines (environment values) and can be large.
    engine.set_policy_length_config(regorus::utils::limits::PolicyLengthConfig {
        max_col: std::num::NonZeroU32::new(64 * 1024).expect("non-zero"),
        max_file_bytes: std::num::NonZeroUsize::new(16 << 20).expect("non-zero"),
        max_lines: std::num::NonZeroUsize::new(200_000).expect("non-zero"),
    });
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVAL_LIMIT,
        check_interval: std::num::NonZeroU32::new(1024).expect("non-zero"),
    });
    engine
}

/// regorus' multi-line diagnostic (`--> file:line:col`, the source line, `error: ...`) as one
/// line: `file:line:col: message`.
fn compact_error(e: &str) -> String {
    let lines: Vec<&str> = e.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let at = lines.iter().find_map(|l| l.strip_prefix("--> "));
    let msg = lines.iter().find_map(|l| l.strip_prefix("error: "));
    match (at, msg) {
        (Some(at), Some(msg)) => format!("{at}: {msg}"),
        _ => lines.join("; "),
    }
}

/// The value of `data.agent_policy.<rule>` (`Undefined` when the rule has no value).
fn eval_rule(engine: &mut regorus::Engine, rule: &str) -> Result<regorus::Value, String> {
    let results =
        engine.eval_query(format!("data.{PACKAGE}.{rule}"), false).map_err(|e| compact_error(&e.to_string()))?;
    Ok(results
        .result
        .into_iter()
        .next()
        .and_then(|r| r.expressions.into_iter().next())
        .map(|e| e.value)
        .unwrap_or(regorus::Value::Undefined))
}

/// Why a request was not allowed.
fn verdict(value: &regorus::Value) -> Result<(), String> {
    match value {
        regorus::Value::Bool(true) => Ok(()),
        regorus::Value::Bool(false) => Err("false".into()),
        regorus::Value::Undefined => Err("undefined (no rule matched and no default)".into()),
        regorus::Value::Object(o) => match o.get(&regorus::Value::from("allowed")) {
            Some(regorus::Value::Bool(true)) => Ok(()),
            _ => Err(format!("{value} (not allowed)")),
        },
        other => Err(format!("{other}, which is not a boolean")),
    }
}

impl AgentPolicy {
    /// No policy: everything is allowed.
    pub fn new(log: Logger) -> AgentPolicy {
        AgentPolicy { log, loaded: Mutex::new(None) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parses and checks `rego`, then makes it the policy. On error the previous policy (if
    /// any) stays; the error names the problem (regorus' message with line and column).
    pub fn set(&self, rego: &str) -> Result<(), String> {
        if rego.trim().is_empty() {
            return Err("the agent policy is empty".into());
        }
        let mut engine = new_engine();
        engine
            .add_policy("agent-policy.rego".into(), rego.into())
            .map_err(|e| format!("invalid agent policy: {}", compact_error(&e.to_string())))?;
        let packages = engine.get_packages().map_err(|e| format!("invalid agent policy: {e}"))?;
        let want = format!("data.{PACKAGE}");
        if !packages.iter().any(|p| p == &want) {
            return Err(format!(
                "invalid agent policy: it must declare `package {PACKAGE}` (found {})",
                packages.join(", ")
            ));
        }
        // Evaluating a rule prepares the whole policy, so errors found then (unknown functions,
        // recursion, ...) reject it here rather than blocking every later request.
        engine.set_input(regorus::Value::new_object());
        let allow_failures = match eval_rule(&mut engine, ALLOW_FAILURES_RULE) {
            Ok(v) => v == regorus::Value::Bool(true),
            Err(e) => return Err(format!("invalid agent policy: {e}")),
        };
        let _ = engine.take_prints();
        if allow_failures {
            warn!(self.log, "agent policy set with AllowRequestsFailingPolicy: blocked requests are only logged");
        }
        info!(self.log, "agent policy set"; "bytes" => rego.len());
        *self.lock() = Some(Loaded { engine, allow_failures });
        Ok(())
    }

    /// Checks request `request_type` (the message name, e.g. `ExecProcessRequest`) of RPC
    /// `rpc` against the policy; `input` builds the request's JSON only when a policy is set.
    /// `Err` is the status to answer.
    pub fn check(
        &self,
        rpc: &str,
        request_type: &str,
        input: impl FnOnce() -> Result<Json, String>,
    ) -> Result<(), ttrpc::Status> {
        let mut guard = self.lock();
        let Some(loaded) = guard.as_mut() else { return Ok(()) };
        let input = input().map_err(|e| ttrpc::get_status(Code::INVALID_ARGUMENT, format!("{rpc}: {e}")))?;
        loaded.engine.set_input(regorus::Value::from(input));
        let result = eval_rule(&mut loaded.engine, request_type)
            .map_err(|e| format!("evaluating data.{PACKAGE}.{request_type} failed: {e}"))
            .and_then(|v| verdict(&v).map_err(|why| format!("data.{PACKAGE}.{request_type} is {why}")));
        let prints = loaded.engine.take_prints().unwrap_or_default().join(" ");
        let allow_failures = loaded.allow_failures;
        drop(guard);
        let Err(why) = result else { return Ok(()) };
        if allow_failures {
            warn!(self.log, "request blocked by the agent policy, allowed by AllowRequestsFailingPolicy"; "rpc" => rpc, "reason" => &why, "prints" => &prints);
            return Ok(());
        }
        warn!(self.log, "request blocked by the agent policy"; "rpc" => rpc, "reason" => &why, "prints" => &prints);
        let mut msg = format!("{rpc} is blocked by the agent policy: {why}");
        if !prints.is_empty() {
            let cut: String = prints.chars().take(PRINTS_MAX).collect();
            msg.push_str(&format!("; policy output: {cut}"));
        }
        Err(ttrpc::get_status(Code::PERMISSION_DENIED, msg))
    }
}

/// Rust keywords: rust-protobuf names such fields `<name>_`, and Kata's JSON uses those names.
const RUST_KEYWORDS: &[&str] = &[
    "_", "as", "async", "await", "break", "crate", "dyn", "else", "enum", "extern", "false", "fn", "for", "if", "impl",
    "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return", "static", "self", "Self", "struct",
    "super", "true", "trait", "type", "unsafe", "use", "while", "continue", "box", "const", "where", "virtual", "proc",
    "alignof", "become", "offsetof", "priv", "pure", "sizeof", "typeof", "unsized", "yield", "do", "abstract", "final",
    "override", "macro",
];

fn json_key(name: &str) -> String {
    if RUST_KEYWORDS.contains(&name) {
        format!("{name}_")
    } else {
        name.to_string()
    }
}

fn upper_camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect::<String>()).unwrap_or_default()
        })
        .collect()
}

fn value_json(v: ReflectValueRef<'_>) -> Json {
    match v {
        ReflectValueRef::U32(n) => n.into(),
        ReflectValueRef::U64(n) => n.into(),
        ReflectValueRef::I32(n) => n.into(),
        ReflectValueRef::I64(n) => n.into(),
        ReflectValueRef::F32(n) => serde_json::Number::from_f64(n as f64).map(Json::Number).unwrap_or(Json::Null),
        ReflectValueRef::F64(n) => serde_json::Number::from_f64(n).map(Json::Number).unwrap_or(Json::Null),
        ReflectValueRef::Bool(b) => b.into(),
        ReflectValueRef::String(s) => s.into(),
        ReflectValueRef::Bytes(b) => Json::Array(b.iter().map(|&x| x.into()).collect()),
        ReflectValueRef::Enum(_, n) => n.into(),
        ReflectValueRef::Message(m) => message_json(&*m),
    }
}

fn map_key(v: ReflectValueRef<'_>) -> String {
    match v {
        ReflectValueRef::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// A protobuf message as Kata's agent serializes requests for its policy (see the module doc).
pub fn message_json(m: &dyn MessageDyn) -> Json {
    let descriptor = m.descriptor_dyn();
    let mut obj = Map::new();
    for field in descriptor.fields() {
        if let Some(oneof) = field.containing_oneof() {
            // A real oneof is one Rust field (the oneof's name) holding an enum: serde writes
            // `{"<Variant>": value}` for the field that is set, `null` when none is.
            let key = json_key(oneof.name());
            let slot = obj.entry(key).or_insert(Json::Null);
            if let Some(v) = field.get_singular(m) {
                let mut one = Map::new();
                one.insert(json_key(&upper_camel(field.name())), value_json(v));
                *slot = Json::Object(one);
            }
            continue;
        }
        let key = json_key(field.name());
        let value = match field.get_reflect(m) {
            ReflectFieldRef::Repeated(r) => Json::Array(r.into_iter().map(value_json).collect()),
            ReflectFieldRef::Map(map) => {
                Json::Object((&map).into_iter().map(|(k, v)| (map_key(k), value_json(v))).collect())
            }
            ReflectFieldRef::Optional(o) => {
                let has_presence = field.proto().proto3_optional()
                    || matches!(
                        field.runtime_field_type(),
                        protobuf::reflect::RuntimeFieldType::Singular(protobuf::reflect::RuntimeType::Message(_))
                    );
                match o.value() {
                    Some(v) => value_json(v),
                    None if has_presence => Json::Null,
                    None => value_json(field.get_singular_field_or_default(m)),
                }
            }
        };
        obj.insert(key, value);
    }
    Json::Object(obj)
}

/// Request message of every `grpc.AgentService` method, from the compiled descriptor.
pub fn request_types() -> HashMap<String, MessageDescriptor> {
    let file = agent_protocol::agent::file_descriptor();
    file.services()
        .filter(|s| s.proto().name() == "AgentService")
        .flat_map(|s| s.methods().map(|m| (m.proto().name().to_string(), m.input_type())).collect::<Vec<_>>())
        .collect()
}

/// Wraps one registered method: the policy decides before the handler runs.
struct Gate {
    rpc: String,
    request: MessageDescriptor,
    policy: Arc<AgentPolicy>,
    inner: Box<dyn MethodHandler + Send + Sync>,
}

#[async_trait]
impl MethodHandler for Gate {
    async fn handler(&self, ctx: TtrpcContext, req: Request) -> ttrpc::Result<Response> {
        let checked = self.policy.check(&self.rpc, self.request.name(), || {
            let m = self
                .request
                .parse_from_bytes(&req.payload)
                .map_err(|e| format!("cannot decode {}: {e}", self.request.name()))?;
            Ok(message_json(&*m))
        });
        if let Err(status) = checked {
            return Ok(<Response as ttrpc::proto::ResponseInit>::init_status(status));
        }
        self.inner.handler(ctx, req).await
    }
}

/// Puts every method of `grpc.AgentService` in `services` behind the policy.
pub fn guard(services: &mut HashMap<String, Service>, policy: &Arc<AgentPolicy>) {
    let types = request_types();
    for (name, service) in services.iter_mut() {
        if name != agent_protocol::AGENT_SERVICE {
            continue;
        }
        let methods = std::mem::take(&mut service.methods);
        for (method, inner) in methods {
            let handler: Box<dyn MethodHandler + Send + Sync> = match types.get(&method) {
                Some(request) => {
                    Box::new(Gate { rpc: method.clone(), request: request.clone(), policy: policy.clone(), inner })
                }
                None => inner,
            };
            service.methods.insert(method, handler);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_protocol::{agent as pb, oci};

    fn policy(rego: &str) -> AgentPolicy {
        let p = AgentPolicy::new(Logger::root(slog::Discard, slog::o!()));
        p.set(rego).unwrap();
        p
    }

    fn exec(args: &[&str]) -> pb::ExecProcessRequest {
        pb::ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e1".into(),
            process: Some(oci::Process { Args: args.iter().map(|s| s.to_string()).collect(), ..Default::default() })
                .into(),
            ..Default::default()
        }
    }

    fn check(p: &AgentPolicy, rpc: &str, m: &dyn MessageDyn) -> Result<(), ttrpc::Status> {
        p.check(rpc, m.descriptor_dyn().name(), || Ok(message_json(m)))
    }

    const ALLOW_ALL_BUT_EXEC: &str = r#"
package agent_policy

default CreateContainerRequest := true
default StartContainerRequest := true
default ReadStreamRequest := true
default SetPolicyRequest := true
default ExecProcessRequest := false
"#;

    #[test]
    fn no_policy_allows_everything() {
        let p = AgentPolicy::new(Logger::root(slog::Discard, slog::o!()));
        assert!(check(&p, "ExecProcess", &exec(&["sh"])).is_ok());
    }

    #[test]
    fn allow_all_but_exec() {
        let p = policy(ALLOW_ALL_BUT_EXEC);
        let start = pb::StartContainerRequest { container_id: "c1".into(), ..Default::default() };
        assert!(check(&p, "StartContainer", &start).is_ok());
        assert!(check(&p, "ReadStdout", &pb::ReadStreamRequest::new()).is_ok());
        let s = check(&p, "ExecProcess", &exec(&["echo", "hi"])).unwrap_err();
        assert_eq!(s.code(), Code::PERMISSION_DENIED);
        assert!(s.message().contains("ExecProcess is blocked by the agent policy"), "{}", s.message());
        assert!(s.message().contains("data.agent_policy.ExecProcessRequest is false"), "{}", s.message());
        // No rule and no default: undefined, blocked.
        let s = check(&p, "RemoveContainer", &pb::RemoveContainerRequest::new()).unwrap_err();
        assert!(s.message().contains("RemoveContainerRequest is undefined"), "{}", s.message());
    }

    #[test]
    fn exec_allowed_only_for_echo_hi() {
        let p = policy(
            r#"
package agent_policy

import future.keywords.if

default ExecProcessRequest := false

ExecProcessRequest if {
    input.process.Args == ["echo", "hi"]
    input.container_id == "c1"
    print("exec allowed:", concat(" ", input.process.Args))
}
"#,
        );
        assert!(check(&p, "ExecProcess", &exec(&["echo", "hi"])).is_ok());
        let s = check(&p, "ExecProcess", &exec(&["echo", "bye"])).unwrap_err();
        assert_eq!(s.code(), Code::PERMISSION_DENIED);
        let s = check(&p, "ExecProcess", &exec(&["sh", "-c", "echo hi"])).unwrap_err();
        assert!(s.message().contains("ExecProcess is blocked"), "{}", s.message());
    }

    #[test]
    fn v0_rules_without_if_and_kata_object_results() {
        // Kata's documented style: a rule body without `if`, and genpolicy's {"allowed": ..}.
        let p = policy(
            r#"
package agent_policy

import future.keywords.in

ExecProcessRequest {
    some a in input.process.Args
    a == "ls"
}

CreateContainerRequest := {"ops": [], "allowed": true} {
    input.OCI.Mounts[0].type_ == "bind"
}
"#,
        );
        assert!(check(&p, "ExecProcess", &exec(&["ls", "-l"])).is_ok());
        assert!(check(&p, "ExecProcess", &exec(&["cat"])).is_err());
        let mut create = pb::CreateContainerRequest::new();
        let mut spec = oci::Spec::new();
        spec.Mounts.push(oci::Mount { type_: "bind".into(), ..Default::default() });
        create.OCI = Some(spec).into();
        assert!(check(&p, "CreateContainer", &create).is_ok());
        create.OCI.as_mut().unwrap().Mounts[0].type_ = "proc".into();
        assert!(check(&p, "CreateContainer", &create).is_err());
    }

    #[test]
    fn invalid_rego_is_rejected_with_its_error_and_keeps_the_old_policy() {
        let p = policy(ALLOW_ALL_BUT_EXEC);
        let e = p.set("package agent_policy\n\ndefault ExecProcessRequest := }\n").unwrap_err();
        assert!(e.starts_with("invalid agent policy: agent-policy.rego:3:"), "the error names the line: {e}");
        assert!(!e.contains('\n'), "one line: {e}");
        // The previous policy is still in force.
        assert!(check(&p, "ExecProcess", &exec(&["sh"])).is_err());

        let e = p.set("package other\n\ndefault ExecProcessRequest := true\n").unwrap_err();
        assert!(e.contains("package agent_policy"), "{e}");
        // Unknown functions surface when a rule using them is evaluated: that request is blocked.
        p.set("package agent_policy\n\ndefault StartContainerRequest := true\nExecProcessRequest { no_such_function(1) }\n").unwrap();
        assert!(check(&p, "StartContainer", &pb::StartContainerRequest::new()).is_ok());
        let s = check(&p, "ExecProcess", &exec(&["sh"])).unwrap_err();
        assert!(
            s.message().contains("evaluating data.agent_policy.ExecProcessRequest failed")
                && s.message().contains("no_such_function"),
            "{}",
            s.message()
        );
        assert!(p.set("  \n").is_err());
    }

    #[test]
    fn allow_requests_failing_policy_only_logs() {
        let p = policy(
            "package agent_policy\n\ndefault AllowRequestsFailingPolicy := true\ndefault ExecProcessRequest := false\n",
        );
        assert!(check(&p, "ExecProcess", &exec(&["sh"])).is_ok());
    }

    #[test]
    fn json_matches_kata_serde_shape() {
        let mut req = exec(&["echo", "hi"]);
        req.process.as_mut().unwrap().User = Some(oci::User { UID: 1000, ..Default::default() }).into();
        let j = message_json(&req);
        assert_eq!(j["container_id"], "c1");
        assert_eq!(j["process"]["Args"], serde_json::json!(["echo", "hi"]));
        assert_eq!(j["process"]["User"]["UID"], 1000);
        assert_eq!(j["process"]["Terminal"], false, "defaults are present");
        assert_eq!(j["string_user"], Json::Null, "unset messages are null");
        assert_eq!(j["stdin_port"], 0);

        let w = pb::WriteStreamRequest { data: vec![1, 2], ..Default::default() };
        assert_eq!(message_json(&w)["data"], serde_json::json!([1, 2]));
        let t = pb::SetGuestDateTimeRequest { Sec: 1 << 40, ..Default::default() };
        assert_eq!(message_json(&t)["Sec"], 1u64 << 40);
    }

    #[test]
    fn every_agent_rpc_has_a_request_type() {
        let types = request_types();
        assert_eq!(types.len(), agent_protocol::AGENT_SERVICE_RPCS.len());
        assert_eq!(types["ExecProcess"].name(), "ExecProcessRequest");
        assert_eq!(types["ReadStderr"].name(), "ReadStreamRequest");
        assert_eq!(types["GetGuestDetails"].name(), "GuestDetailsRequest");
        assert_eq!(types["SetPolicy"].name(), "SetPolicyRequest");
    }

    #[test]
    fn evaluation_is_cheap() {
        let p = policy(ALLOW_ALL_BUT_EXEC);
        let start = pb::StartContainerRequest { container_id: "c1".into(), ..Default::default() };
        let t = std::time::Instant::now();
        for _ in 0..200 {
            check(&p, "StartContainer", &start).unwrap();
        }
        eprintln!("policy check: {:?} each", t.elapsed() / 200);
    }

    /// The gate over real ttrpc: SetPolicy, a blocked RPC, a blocked SetPolicy, Health untouched.
    #[tokio::test]
    async fn gate_over_ttrpc() {
        use agent_protocol::agent_ttrpc::AgentServiceClient;
        use agent_protocol::health_ttrpc::HealthClient;
        let dir = std::env::temp_dir().join(format!("podvisor-agent-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = format!("unix://{}", dir.join("agent.sock").display());
        let log = Logger::root(slog::Discard, slog::o!());
        let containers = Arc::new(crate::container::Containers::new(
            log.clone(),
            crate::container::reaper::Reaper::new(),
            dir.join("run"),
            false,
        ));
        let mut server = ttrpc::asynchronous::Server::new()
            .bind(&sock)
            .unwrap()
            .register_service(crate::rpc::services(log, Arc::new(tokio::sync::Notify::new()), containers));
        server.start().await.unwrap();
        let client = ttrpc::asynchronous::Client::connect(&sock).await.unwrap();
        let agent = AgentServiceClient::new(client.clone());
        let health = HealthClient::new(client);
        let ctx = || ttrpc::context::with_timeout(5_000_000_000);
        let code = |e: ttrpc::Error| match e {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("expected a status, got {other:?}"),
        };

        // No policy: an exec of an unknown container gets to the handler (NOT_FOUND).
        let (c, _) = code(agent.exec_process(ctx(), &exec(&["sh"])).await.unwrap_err());
        assert_eq!(c, Code::NOT_FOUND);

        let bad =
            pb::SetPolicyRequest { policy: "package agent_policy\n\ndefault x := }\n".into(), ..Default::default() };
        let (c, m) = code(agent.set_policy(ctx(), &bad).await.unwrap_err());
        assert_eq!(c, Code::INVALID_ARGUMENT);
        assert!(m.starts_with("invalid agent policy: agent-policy.rego:3:"), "{m}");

        let set = |rego: &str| pb::SetPolicyRequest { policy: rego.into(), ..Default::default() };
        agent.set_policy(ctx(), &set(ALLOW_ALL_BUT_EXEC)).await.unwrap();
        let (c, m) = code(agent.exec_process(ctx(), &exec(&["sh"])).await.unwrap_err());
        assert_eq!(c, Code::PERMISSION_DENIED);
        assert!(m.contains("ExecProcess is blocked by the agent policy"), "{m}");
        // Allowed RPCs reach their handler; unimplemented ones are checked too.
        let start = pb::StartContainerRequest { container_id: "nope".into(), ..Default::default() };
        assert_eq!(code(agent.start_container(ctx(), &start).await.unwrap_err()).0, Code::NOT_FOUND);
        assert_eq!(
            code(agent.get_ip_tables(ctx(), &pb::GetIPTablesRequest::new()).await.unwrap_err()).0,
            Code::PERMISSION_DENIED
        );
        health.check(ctx(), &agent_protocol::health::CheckRequest::new()).await.unwrap();

        // SetPolicy is allowed by this policy: replace it with one that forbids SetPolicy.
        agent.set_policy(ctx(), &set("package agent_policy\n\ndefault SetPolicyRequest := false\n")).await.unwrap();
        let (c, m) = code(agent.set_policy(ctx(), &set(ALLOW_ALL_BUT_EXEC)).await.unwrap_err());
        assert_eq!(c, Code::PERMISSION_DENIED);
        assert!(m.contains("SetPolicy is blocked by the agent policy"), "{m}");

        server.shutdown().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
