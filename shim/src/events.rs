//! Publishing task events (`/tasks/create`, `/tasks/exit`, …) to containerd.
//!
//! containerd starts the shim with `TTRPC_ADDRESS=<containerd.sock>.ttrpc` and expects each
//! event as a `containerd.services.events.ttrpc.v1.Events/Forward` call on a connection the shim
//! opens to that address. The envelope carries the time, the namespace, the topic and the event
//! as an `Any` whose `type_url` is the event's full protobuf name (`containerd.events.TaskExit`):
//! containerd 1.6 resolves it with typeurl, which falls back to the proto registry by name.
//! CRI-O passes `TTRPC_ADDRESS` empty and reads no events; then each event is only logged.
//!
//! [`Publisher::publish_task`] never waits: events go through an unbounded queue to one background
//! task, which connects on the first event, reconnects once when a call fails and gives each
//! call [`CALL_TIMEOUT`]. An event that still cannot be delivered is dropped with a warning, so a
//! dead containerd never stalls the task service. Call [`Publisher::close`] before exiting so the
//! last `/tasks/exit` and `/tasks/delete` get out.
//!
//! ```no_run
//! # async fn demo(log: slog::Logger) {
//! use containerd_shim_protos::events::task::TaskExit;
//! use podvisor_shim::events::Publisher;
//!
//! let events = Publisher::new(std::env::var("TTRPC_ADDRESS").ok(), "k8s.io".into(), log);
//! events.publish_task(TaskExit { container_id: "c1".into(), id: "c1".into(), exit_status: 3, ..Default::default() });
//! events.close().await;
//! # }
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused, TaskResumed, TaskStart,
};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::topics;
use protobuf::well_known_types::any::Any;
use protobuf::well_known_types::timestamp::Timestamp;
use protobuf::{MessageField, MessageFull};
use slog::{debug, info, warn, Logger};
use tokio::sync::{mpsc, oneshot};

/// The longest one connect or one `Forward` call to containerd may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest [`Publisher::close`] waits for queued events to go out.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// The ttrpc metadata key containerd reads the namespace from.
const NAMESPACE_METADATA: &str = "containerd-namespace-ttrpc";

/// A containerd task event and the topic it is published under.
pub trait TaskEvent: MessageFull {
    /// The topic, e.g. `/tasks/exit`.
    const TOPIC: &'static str;
}

macro_rules! task_events {
    ($($event:ty => $topic:expr),* $(,)?) => {
        $(impl TaskEvent for $event {
            const TOPIC: &'static str = $topic;
        })*
    };
}

task_events! {
    TaskCreate => topics::TASK_CREATE_EVENT_TOPIC,
    TaskStart => topics::TASK_START_EVENT_TOPIC,
    TaskExecAdded => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
    TaskExecStarted => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
    TaskExit => topics::TASK_EXIT_EVENT_TOPIC,
    TaskDelete => topics::TASK_DELETE_EVENT_TOPIC,
    TaskPaused => topics::TASK_PAUSED_EVENT_TOPIC,
    TaskResumed => topics::TASK_RESUMED_EVENT_TOPIC,
    TaskOOM => topics::TASK_OOM_EVENT_TOPIC,
}

/// Packs `event` into an `Any` the way containerd's typeurl reads it back: `type_url` is the
/// bare full protobuf name (`containerd.events.TaskExit`), with no `type.googleapis.com/`.
pub fn to_any<E: MessageFull>(event: &E) -> protobuf::Result<Any> {
    Ok(Any { type_url: E::descriptor().full_name().to_string(), value: event.write_to_bytes()?, ..Default::default() })
}

/// Publishes task events to containerd, or logs them when there is no containerd to tell.
/// Cheap to clone; all clones share one queue and one connection.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    namespace: String,
    log: Logger,
    route: Route,
}

enum Route {
    /// No `TTRPC_ADDRESS`: log each event.
    LogOnly,
    /// Forward to containerd through the background task.
    Forward {
        address: String,
        queue: mpsc::UnboundedSender<Command>,
        /// The queue's receiving end until the background task is spawned, which happens on
        /// the first event published inside a tokio runtime.
        pending: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    },
}

enum Command {
    Event { topic: String, request: ForwardRequest },
    Flush(oneshot::Sender<()>),
}

impl Publisher {
    /// A publisher for containerd at `ttrpc_address` (the `TTRPC_ADDRESS` variable: a socket
    /// path, or an address with a `unix://` scheme), with `namespace` in every envelope. With
    /// no address, or an empty one (CRI-O), events are logged at info level instead.
    pub fn new(ttrpc_address: Option<String>, namespace: String, log: Logger) -> Publisher {
        let log = log.new(slog::o!(crate::logging::keys::SUBSYSTEM => "events"));
        let route = match ttrpc_address.as_deref().map(str::trim) {
            None | Some("") => Route::LogOnly,
            Some(address) => {
                let address = if address.contains("://") { address.to_string() } else { format!("unix://{address}") };
                let (queue, pending) = mpsc::unbounded_channel();
                Route::Forward { address, queue, pending: Mutex::new(Some(pending)) }
            }
        };
        Publisher { inner: Arc::new(Inner { namespace, log, route }) }
    }

    /// Whether events go to containerd (rather than only to the log).
    pub fn forwards(&self) -> bool {
        matches!(self.inner.route, Route::Forward { .. })
    }

    /// Queues `event` under `topic` and returns at once. Delivery happens in the background;
    /// failures are logged, never returned.
    fn send<E: MessageFull>(&self, topic: &str, event: E) {
        let log = &self.inner.log;
        let Route::Forward { queue, .. } = &self.inner.route else {
            info!(log, "event"; "topic" => topic, "event" => %event);
            return;
        };
        let any = match to_any(&event) {
            Ok(any) => any,
            Err(e) => {
                warn!(log, "event dropped: it does not encode"; "topic" => topic, "error" => %e);
                return;
            }
        };
        let envelope = Envelope {
            timestamp: MessageField::some(Timestamp::now()),
            namespace: self.inner.namespace.clone(),
            topic: topic.to_string(),
            event: MessageField::some(any),
            ..Default::default()
        };
        let request = ForwardRequest { envelope: MessageField::some(envelope), ..Default::default() };
        debug!(log, "event queued"; "topic" => topic);
        if queue.send(Command::Event { topic: topic.to_string(), request }).is_err() {
            warn!(log, "event dropped: the publisher task has stopped"; "topic" => topic);
        }
        self.start_worker();
    }

    /// Queues `event` under its own topic and returns at once. Delivery happens in the
    /// background; failures are logged, never returned. (The pod's events come here through
    /// `service.rs`, which maps each to its containerd type.)
    pub fn publish_task<E: TaskEvent>(&self, event: E) {
        self.send(E::TOPIC, event)
    }

    /// Waits until every event published so far has been delivered or dropped, for at most
    /// [`CLOSE_TIMEOUT`]. Returns false when time ran out with events still queued. The
    /// publisher stays usable.
    pub async fn close(&self) -> bool {
        let Route::Forward { queue, .. } = &self.inner.route else { return true };
        self.start_worker();
        let (done, flushed) = oneshot::channel();
        if queue.send(Command::Flush(done)).is_err() {
            return true;
        }
        match tokio::time::timeout(CLOSE_TIMEOUT, flushed).await {
            Ok(_) => true,
            Err(_) => {
                warn!(self.inner.log, "events still queued after {CLOSE_TIMEOUT:?}; they are lost");
                false
            }
        }
    }

    /// Spawns the background task if it is not running and a tokio runtime is at hand.
    fn start_worker(&self) {
        let Route::Forward { address, pending, .. } = &self.inner.route else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let mut pending = pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(queue) = pending.take() {
            let worker = Worker {
                address: address.clone(),
                namespace: self.inner.namespace.clone(),
                log: self.inner.log.clone(),
                client: None,
            };
            runtime.spawn(worker.run(queue));
        }
    }
}

/// The background task: one connection, events in order.
struct Worker {
    address: String,
    namespace: String,
    log: Logger,
    client: Option<EventsClient>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = queue.recv().await {
            match command {
                Command::Event { topic, request } => self.deliver(&topic, &request).await,
                Command::Flush(done) => {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Forwards one event, reconnecting once if the connection is missing or broken.
    async fn deliver(&mut self, topic: &str, request: &ForwardRequest) {
        let mut error = String::new();
        for _attempt in 0..2 {
            let client = match &self.client {
                Some(client) => client,
                None => match tokio::time::timeout(CALL_TIMEOUT, Client::connect(&self.address)).await {
                    Ok(Ok(client)) => self.client.insert(EventsClient::new(client)),
                    Ok(Err(e)) => {
                        error = format!("cannot connect: {e}");
                        continue;
                    }
                    Err(_) => {
                        error = format!("cannot connect: no answer within {CALL_TIMEOUT:?}");
                        continue;
                    }
                },
            };
            let mut ctx = ttrpc::context::with_timeout(CALL_TIMEOUT.as_nanos() as i64);
            ctx.add(NAMESPACE_METADATA.to_string(), self.namespace.clone());
            // The ttrpc timeout covers the reply; this one also covers a stuck write.
            match tokio::time::timeout(CALL_TIMEOUT + Duration::from_secs(1), client.forward(ctx, request)).await {
                Ok(Ok(_)) => {
                    debug!(self.log, "event forwarded"; "topic" => topic);
                    return;
                }
                // containerd answered and refused it: another try would get the same answer.
                Ok(Err(ttrpc::Error::RpcStatus(status))) => {
                    error = format!("containerd refused it: {:?}: {}", status.code(), status.message());
                    break;
                }
                Ok(Err(e)) => {
                    error = format!("Forward failed: {e}");
                    self.client = None;
                }
                Err(_) => {
                    error = format!("Forward got no answer within {CALL_TIMEOUT:?}");
                    self.client = None;
                }
            }
        }
        warn!(self.log, "event dropped"; "topic" => topic, "address" => &self.address, "error" => error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use async_trait::async_trait;
    use containerd_shim_protos::shim_async::{create_events, Events};
    use protobuf::well_known_types::empty::Empty;
    use protobuf::Message;
    use ttrpc::asynchronous::{Server, TtrpcContext};

    use crate::logging::capture_log;

    /// Records what it is sent; optionally refuses everything.
    struct FakeContainerd {
        received: tokio::sync::mpsc::UnboundedSender<(ForwardRequest, Vec<String>)>,
    }

    #[async_trait]
    impl Events for FakeContainerd {
        async fn forward(&self, ctx: &TtrpcContext, req: ForwardRequest) -> ttrpc::Result<Empty> {
            let namespace = ctx.metadata.get(NAMESPACE_METADATA).cloned().unwrap_or_default();
            let _ = self.received.send((req, namespace));
            Ok(Empty::new())
        }
    }

    type Received = tokio::sync::mpsc::UnboundedReceiver<(ForwardRequest, Vec<String>)>;

    async fn serve(path: &std::path::Path) -> (Server, Received) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let service = create_events(Arc::new(FakeContainerd { received: tx }));
        let mut server = Server::new().bind(&format!("unix://{}", path.display())).unwrap().register_service(service);
        server.start().await.unwrap();
        (server, rx)
    }

    fn envelope(request: &ForwardRequest) -> &Envelope {
        request.envelope.as_ref().expect("ForwardRequest without an envelope")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_reach_containerd_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let (mut server, mut received) = serve(&socket).await;
        let (log, _) = capture_log();
        // A bare path, as containerd passes it.
        let events = Publisher::new(Some(socket.display().to_string()), "k8s.io".into(), log);
        assert!(events.forwards());

        let before = std::time::SystemTime::now();
        events.publish_task(TaskCreate {
            container_id: "c1".into(),
            bundle: "/run/b/c1".into(),
            pid: 7,
            ..Default::default()
        });
        let exited_at = Timestamp::now();
        events.publish_task(TaskExit {
            container_id: "c1".into(),
            id: "c1".into(),
            pid: 7,
            exit_status: 3,
            exited_at: MessageField::some(exited_at.clone()),
            ..Default::default()
        });
        assert!(events.close().await, "close timed out");

        let (create, namespace) = received.try_recv().expect("TaskCreate was not forwarded");
        assert_eq!(namespace, vec!["k8s.io".to_string()], "namespace metadata");
        let env = envelope(&create);
        assert_eq!(env.topic, "/tasks/create");
        assert_eq!(env.namespace, "k8s.io");
        let stamped: std::time::SystemTime = env.timestamp.as_ref().unwrap().clone().into();
        assert!(stamped >= before - Duration::from_secs(1), "timestamp {stamped:?} is not now");
        let any = env.event.as_ref().unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskCreate");
        let create = TaskCreate::parse_from_bytes(&any.value).unwrap();
        assert_eq!((create.container_id.as_str(), create.bundle.as_str(), create.pid), ("c1", "/run/b/c1", 7));

        let (exit, _) = received.try_recv().expect("TaskExit was not forwarded");
        let env = envelope(&exit);
        assert_eq!(env.topic, "/tasks/exit");
        let any = env.event.as_ref().unwrap();
        assert_eq!(any.type_url, "containerd.events.TaskExit");
        let exit = TaskExit::parse_from_bytes(&any.value).unwrap();
        assert_eq!((exit.id.as_str(), exit.exit_status, exit.exited_at.as_ref()), ("c1", 3, Some(&exited_at)));

        assert!(received.try_recv().is_err(), "more events than published");
        server.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_containerd_gets_later_events() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let (mut server, mut received) = serve(&socket).await;
        let (log, lines) = capture_log();
        let events = Publisher::new(Some(format!("unix://{}", socket.display())), "default".into(), log);
        events.publish_task(TaskStart { container_id: "c1".into(), pid: 9, ..Default::default() });
        assert!(events.close().await);
        assert_eq!(envelope(&received.try_recv().unwrap().0).topic, "/tasks/start");

        server.shutdown().await.unwrap();
        drop(server);
        let _ = std::fs::remove_file(&socket);
        let (mut server, mut received) = serve(&socket).await;
        events.publish_task(TaskPaused { container_id: "c1".into(), ..Default::default() });
        assert!(events.close().await);
        let (paused, _) = received.try_recv().expect("the event after a reconnect was lost");
        assert_eq!(envelope(&paused).topic, "/tasks/paused");
        let logged = lines.lock().unwrap().clone();
        assert!(!logged.iter().any(|l| l.contains("event dropped")), "{logged:?}");
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn without_an_address_events_are_logged() {
        for address in [None, Some(String::new())] {
            let (log, lines) = capture_log();
            let events = Publisher::new(address, "default".into(), log);
            assert!(!events.forwards());
            events.publish_task(TaskOOM { container_id: "c9".into(), ..Default::default() });
            assert!(events.close().await);
            let lines = lines.lock().unwrap();
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(lines[0].starts_with("INFO event"), "{}", lines[0]);
            assert!(lines[0].contains("topic=/tasks/oom"), "{}", lines[0]);
            assert!(lines[0].contains("c9"), "the event's fields are logged: {}", lines[0]);
        }
    }

    #[tokio::test]
    async fn a_dead_address_neither_blocks_nor_panics() {
        let dir = tempfile::tempdir().unwrap();
        let (log, lines) = capture_log();
        let events = Publisher::new(Some(dir.path().join("nobody.sock").display().to_string()), "k8s.io".into(), log);
        let started = Instant::now();
        for pid in 0..20 {
            events.publish_task(TaskExit { container_id: "c1".into(), pid, ..Default::default() });
        }
        assert!(started.elapsed() < Duration::from_millis(100), "publish waited {:?}", started.elapsed());
        assert!(events.close().await, "a dead address should fail fast, not time out");
        assert!(started.elapsed() < CLOSE_TIMEOUT + Duration::from_millis(500));
        let lines = lines.lock().unwrap();
        let dropped: Vec<&String> = lines.iter().filter(|l| l.starts_with("WARNING event dropped")).collect();
        assert_eq!(dropped.len(), 20, "{lines:?}");
        assert!(dropped[0].contains("topic=/tasks/exit") && dropped[0].contains("cannot connect"), "{}", dropped[0]);
    }

    #[test]
    fn publishing_outside_a_runtime_queues_until_close() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock.ttrpc");
        let (log, _) = capture_log();
        let events = Publisher::new(Some(socket.display().to_string()), "default".into(), log);
        // No runtime here: nothing may panic, and the event waits in the queue.
        events.publish_task(TaskDelete { container_id: "c1".into(), exit_status: 137, ..Default::default() });

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        runtime.block_on(async {
            let (mut server, mut received) = serve(&socket).await;
            assert!(events.close().await);
            let (delete, _) = received.try_recv().expect("the queued event was not sent");
            let any = envelope(&delete).event.as_ref().unwrap();
            assert_eq!(any.type_url, "containerd.events.TaskDelete");
            assert_eq!(TaskDelete::parse_from_bytes(&any.value).unwrap().exit_status, 137);
            server.shutdown().await.unwrap();
        });
    }

    #[test]
    fn every_task_event_has_its_containerd_topic() {
        assert_eq!(TaskCreate::TOPIC, "/tasks/create");
        assert_eq!(TaskStart::TOPIC, "/tasks/start");
        assert_eq!(TaskExecAdded::TOPIC, "/tasks/exec-added");
        assert_eq!(TaskExecStarted::TOPIC, "/tasks/exec-started");
        assert_eq!(TaskExit::TOPIC, "/tasks/exit");
        assert_eq!(TaskDelete::TOPIC, "/tasks/delete");
        assert_eq!(TaskPaused::TOPIC, "/tasks/paused");
        assert_eq!(TaskResumed::TOPIC, "/tasks/resumed");
        assert_eq!(TaskOOM::TOPIC, "/tasks/oom");
        assert_eq!(to_any(&TaskExecStarted::default()).unwrap().type_url, "containerd.events.TaskExecStarted");
    }
}
