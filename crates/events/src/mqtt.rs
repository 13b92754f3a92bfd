//! The MQTT listener for sensors: MQTT 3.1.1 and 5 over TCP, QoS 0 and 1, publish only.
//!
//! A PUBACK is sent only after the event is durable in its topic, and PUBACKs go out in the
//! order the PUBLISH packets came in (the protocol requires it) while up to
//! `in_flight_max` publishes of one connection are being stored at once.
//!
//! Topic mapping: see [`Events::route_mqtt`]. What is refused, and how:
//!
//! | problem | MQTT 5 | MQTT 3.1.1 |
//! |---|---|---|
//! | wrong password | CONNACK 0x86 | CONNACK 4 |
//! | unknown topic (QoS 1) | PUBACK 0x90 | connection closed (3.1.1 has no negative PUBACK) |
//! | topic the client may not publish to (QoS 1) | PUBACK 0x87 | connection closed |
//! | event could not be stored, or its topic is declared but not open yet (QoS 1) | PUBACK 0x80 | connection closed |
//! | packet over the size limit | DISCONNECT 0x95 | connection closed |
//! | more distinct topics than allowed | PUBACK 0x97 | connection closed |
//! | QoS 2 | DISCONNECT 0x9B | connection closed |
//! | malformed packet | DISCONNECT 0x81 | connection closed |
//! | SUBSCRIBE | SUBACK 0x80 for every filter | SUBACK 0x80 for every filter |
//! | topic name longer than any topic and key | PUBACK 0x90 | connection closed |
//!
//! Bounds against clients that never authenticate or send abusive names: a short CONNECT
//! deadline, a cap on connections per address, topic names no longer than a declared
//! topic plus a key, and a bounded cache of routes per connection.
//!
//! A QoS 0 event that cannot be stored is dropped and logged; QoS 0 promises no more.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqttbytes::{Protocol, QoS, v4, v5};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Events;
use crate::access::{Gate, Producer};
use crate::record::NewEvent;
use crate::topic::{AppendError, Appending};

#[derive(Debug, Clone)]
pub struct MqttConfig {
    /// Who may connect (the password is the secret; any user name is accepted) and
    /// publish where.
    pub gate: Gate,
    pub connections_max: usize,
    /// Connections from one address at once: one client cannot take every slot.
    pub connections_per_address_max: usize,
    /// The largest packet accepted; the payload limit is this minus the topic and header.
    pub packet_bytes_max: usize,
    /// Distinct topic names one connection may publish to.
    pub topics_per_connection_max: usize,
    /// Publishes of one connection being stored at once (MQTT 5 "receive maximum").
    pub in_flight_max: u16,
    /// A client must send CONNECT within this time.
    pub connect_timeout: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            gate: Gate::Token(String::new()),
            connections_max: 10_000,
            connections_per_address_max: 1000,
            packet_bytes_max: 256 * 1024,
            topics_per_connection_max: 1000,
            in_flight_max: 64,
            // Long enough for a sensor on a slow link, short enough that connections which
            // never authenticate cannot pile up.
            connect_timeout: Duration::from_secs(3),
        }
    }
}

fn topic_hash(topic: &str) -> u64 {
    let hash = blake3::hash(topic.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// What a client sent, reduced to what the listener acts on.
#[derive(Debug, PartialEq)]
pub enum Packet {
    Connect {
        protocol: Protocol,
        client_id: String,
        keep_alive: u16,
        password: Option<String>,
    },
    Publish {
        qos: QoS,
        pkid: u16,
        topic: String,
        topic_alias: Option<u16>,
        content_type: Option<String>,
        payload: Bytes,
    },
    Subscribe {
        pkid: u16,
        filters: usize,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    PingReq,
    Disconnect,
    /// A packet a client may send but this listener has no use for (PUBACK, PUBREL, ...).
    Ignored,
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
    #[error("the first packet must be CONNECT")]
    NotConnect,
    #[error("unsupported protocol level {0}; use MQTT 3.1.1 (4) or 5")]
    UnsupportedProtocol(u8),
}

/// Take one packet off the front of `buffer`. `Ok(None)` means more bytes are needed.
/// `protocol` is `None` until CONNECT has been read, which decides it.
pub fn decode(
    protocol: Option<Protocol>,
    buffer: &mut BytesMut,
    packet_bytes_max: usize,
) -> Result<Option<Packet>, DecodeError> {
    match mqttbytes::check(buffer.iter(), packet_bytes_max) {
        Ok(_) => {}
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mqttbytes::Error::PayloadSizeLimitExceeded(size)) => {
            return Err(DecodeError::TooLarge(size));
        }
        Err(error) => return Err(DecodeError::Malformed(format!("{error:?}"))),
    };
    let protocol = match protocol {
        Some(protocol) => protocol,
        None => {
            if buffer[0] >> 4 != 1 {
                return Err(DecodeError::NotConnect);
            }
            // CONNECT's variable header starts with the protocol name "MQTT" and level.
            let length_bytes = buffer[1..]
                .iter()
                .take(4)
                .position(|b| b & 0x80 == 0)
                .map_or(4, |i| i + 1);
            let at = 1 + length_bytes + 6;
            match buffer.get(at) {
                Some(4) => Protocol::V4,
                Some(5) => Protocol::V5,
                Some(level) => return Err(DecodeError::UnsupportedProtocol(*level)),
                None => return Err(DecodeError::Malformed("CONNECT too short".into())),
            }
        }
    };
    let malformed = |error: mqttbytes::Error| DecodeError::Malformed(format!("{error:?}"));
    let packet = match protocol {
        Protocol::V4 => match v4::read(buffer, packet_bytes_max).map_err(malformed)? {
            v4::Packet::Connect(connect) => Packet::Connect {
                protocol,
                client_id: connect.client_id,
                keep_alive: connect.keep_alive,
                password: connect.login.map(|l| l.password),
            },
            v4::Packet::Publish(publish) => Packet::Publish {
                qos: publish.qos,
                pkid: publish.pkid,
                topic: publish.topic,
                topic_alias: None,
                content_type: None,
                payload: publish.payload,
            },
            v4::Packet::Subscribe(subscribe) => Packet::Subscribe {
                pkid: subscribe.pkid,
                filters: subscribe.filters.len(),
            },
            v4::Packet::Unsubscribe(unsubscribe) => Packet::Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: unsubscribe.topics.len(),
            },
            v4::Packet::PingReq => Packet::PingReq,
            v4::Packet::Disconnect => Packet::Disconnect,
            _ => Packet::Ignored,
        },
        Protocol::V5 => match v5::read(buffer, packet_bytes_max).map_err(malformed)? {
            v5::Packet::Connect(connect) => Packet::Connect {
                protocol,
                client_id: connect.client_id,
                keep_alive: connect.keep_alive,
                password: connect.login.map(|l| l.password),
            },
            v5::Packet::Publish(publish) => {
                let (topic_alias, content_type) = publish
                    .properties
                    .map(|p| (p.topic_alias, p.content_type))
                    .unwrap_or_default();
                Packet::Publish {
                    qos: publish.qos,
                    pkid: publish.pkid,
                    topic: publish.topic,
                    topic_alias,
                    content_type,
                    payload: publish.payload,
                }
            }
            v5::Packet::Subscribe(subscribe) => Packet::Subscribe {
                pkid: subscribe.pkid,
                filters: subscribe.filters.len(),
            },
            v5::Packet::Unsubscribe(unsubscribe) => Packet::Unsubscribe {
                pkid: unsubscribe.pkid,
                filters: unsubscribe.filters.len(),
            },
            v5::Packet::PingReq => Packet::PingReq,
            v5::Packet::Disconnect(_) => Packet::Disconnect,
            _ => Packet::Ignored,
        },
    };
    Ok(Some(packet))
}

/// Accept MQTT connections until `shutdown` fires.
/// Accept MQTT connections until `shutdown` fires; over TLS with `tls` (MQTT's 8883
/// convention), each handshake within `connect_timeout`.
pub async fn serve(
    events: Arc<Events>,
    listener: TcpListener,
    config: MqttConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    let permits = Arc::new(tokio::sync::Semaphore::new(config.connections_max.max(1)));
    // Open connections per client address; an entry lives only while its connections do,
    // so the map is bounded by `connections_max`.
    let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "mqtt accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            // Over the connection limit: refuse at once rather than queue silently.
            tracing::warn!(%peer, limit = config.connections_max, "mqtt connection refused: too many connections");
            drop(stream);
            continue;
        };
        let Some(address_slot) =
            AddressSlot::take(&per_address, peer.ip(), config.connections_per_address_max)
        else {
            tracing::warn!(%peer, limit = config.connections_per_address_max, "mqtt connection refused: too many connections from this address");
            drop(stream);
            continue;
        };
        _ = stream.set_nodelay(true);
        let events = events.clone();
        let config = config.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let halves: (Reader, Writer) = match tls {
                None => {
                    let (reader, writer) = stream.into_split();
                    (Box::new(reader), Box::new(writer))
                }
                Some(acceptor) => {
                    match tokio::time::timeout(config.connect_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(stream)) => {
                            let (reader, writer) = tokio::io::split(stream);
                            (Box::new(reader), Box::new(writer))
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "mqtt TLS handshake failed");
                            drop((permit, address_slot));
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "mqtt TLS handshake timed out");
                            drop((permit, address_slot));
                            return;
                        }
                    }
                }
            };
            let mut connection = Connection::new(halves, peer.ip(), events, config);
            tokio::select! {
                result = connection.run() => {
                    if let Err(why) = result {
                        tracing::info!(%peer, client = connection.client_id, %why, "mqtt connection closed");
                    }
                }
                _ = shutdown.cancelled() => connection.shutting_down().await,
            }
            drop(address_slot);
            drop(permit);
        });
    }
    connections.shutdown().await;
}

/// One connection's count in the per-address table, given back when dropped.
struct AddressSlot {
    table: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl AddressSlot {
    fn take(
        table: &Arc<Mutex<HashMap<IpAddr, usize>>>,
        address: IpAddr,
        max: usize,
    ) -> Option<Self> {
        let mut counts = table.lock().expect("address table lock is never poisoned");
        let count = counts.entry(address).or_insert(0);
        if *count >= max.max(1) {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            table: table.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self
            .table
            .lock()
            .expect("address table lock is never poisoned");
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// The longest MQTT topic that can name a declared topic and a key: anything longer is
/// refused before any lookup, which bounds the work and memory one name can cause.
pub const MQTT_TOPIC_BYTES_MAX: usize =
    crate::broker::TOPIC_NAME_BYTES_MAX + 1 + crate::record::ATTRIBUTE_BYTES_MAX;
/// Routes a connection keeps looked up.
const ROUTES_CACHED_MAX: usize = 256;

type Stored = Result<(), AppendError>;
type Route = (Arc<crate::Topic>, String);

enum ReadFailure {
    Io(String),
    Decode(DecodeError),
}

enum Step {
    Read(Result<Packet, ReadFailure>),
    Idle,
    Stored(Result<std::ops::Range<u64>, AppendError>),
}

/// One side of a connection, plain or TLS.
type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

async fn read_packet(
    reader: &mut Reader,
    buffer: &mut BytesMut,
    protocol: Option<Protocol>,
    packet_bytes_max: usize,
) -> Result<Packet, ReadFailure> {
    loop {
        if let Some(packet) =
            decode(protocol, buffer, packet_bytes_max).map_err(ReadFailure::Decode)?
        {
            return Ok(packet);
        }
        buffer.reserve(8 * 1024);
        match reader.read_buf(buffer).await {
            Ok(0) => return Err(ReadFailure::Io("the client closed the connection".into())),
            Ok(_) => {}
            Err(error) => return Err(ReadFailure::Io(format!("read: {error}"))),
        }
    }
}

struct InFlight {
    pkid: u16,
    qos: QoS,
    /// Queued at the topic's writer as it arrived; awaited in arrival order.
    stored: Appending,
}

struct Connection {
    reader: Reader,
    writer: Writer,
    events: Arc<Events>,
    config: Arc<MqttConfig>,
    protocol: Option<Protocol>,
    client_id: String,
    buffer: BytesMut,
    /// Hashes of the distinct topics published to (for the per-connection quota).
    topics: HashSet<u64>,
    /// Where each topic name published on this connection goes. A topic closed since
    /// (redeployed with a new configuration) fails its append; the entry is then dropped.
    routes: HashMap<String, Route>,
    /// The events' source: `mqtt:CLIENT-ID`.
    source: String,
    aliases: HashMap<u16, String>,
    in_flight: VecDeque<InFlight>,
    out: BytesMut,
    /// Who connected (set by a CONNECT with a valid password).
    producer: Option<Arc<dyn Producer>>,
    peer: Option<IpAddr>,
}

const ALIASES_MAX: u16 = 64;

impl Connection {
    fn new(
        (reader, writer): (Reader, Writer),
        peer: IpAddr,
        events: Arc<Events>,
        config: Arc<MqttConfig>,
    ) -> Self {
        let peer = Some(peer);
        Connection {
            reader,
            writer,
            events,
            config,
            protocol: None,
            client_id: String::new(),
            buffer: BytesMut::with_capacity(8 * 1024),
            topics: HashSet::new(),
            routes: HashMap::new(),
            source: String::new(),
            aliases: HashMap::new(),
            in_flight: VecDeque::new(),
            out: BytesMut::new(),
            producer: None,
            peer,
        }
    }

    async fn shutting_down(&mut self) {
        if self.protocol == Some(Protocol::V5) {
            self.disconnect(v5::DisconnectReasonCode::ServerShuttingDown)
                .await;
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if !self.out.is_empty() {
            self.writer
                .write_all(&self.out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            self.out.clear();
        }
        Ok(())
    }

    async fn disconnect(&mut self, reason: v5::DisconnectReasonCode) {
        if self.protocol == Some(Protocol::V5) {
            let mut packet = v5::Disconnect::new();
            packet.reason_code = reason;
            if packet.write(&mut self.out).is_ok() {
                _ = self.flush().await;
            }
        }
    }

    /// Read the next packet, waiting at most `wait`; on a protocol error tell the client
    /// why (MQTT 5) before giving up.
    async fn next_packet(&mut self, wait: Duration) -> Result<Packet, String> {
        let read = tokio::time::timeout(
            wait,
            read_packet(
                &mut self.reader,
                &mut self.buffer,
                self.protocol,
                self.config.packet_bytes_max,
            ),
        )
        .await
        .unwrap_or_else(|_| Err(ReadFailure::Io("timed out waiting for a packet".into())));
        self.after_read(read).await
    }

    async fn after_read(&mut self, read: Result<Packet, ReadFailure>) -> Result<Packet, String> {
        match read {
            Ok(packet) => Ok(packet),
            Err(ReadFailure::Io(why)) => Err(why),
            Err(ReadFailure::Decode(error)) => {
                let reason = match error {
                    DecodeError::TooLarge(_) => v5::DisconnectReasonCode::PacketTooLarge,
                    _ => v5::DisconnectReasonCode::MalformedPacket,
                };
                self.disconnect(reason).await;
                Err(error.to_string())
            }
        }
    }

    async fn run(&mut self) -> Result<(), String> {
        let Packet::Connect {
            protocol,
            client_id,
            keep_alive,
            password,
        } = self.next_packet(self.config.connect_timeout).await?
        else {
            return Err("the first packet was not CONNECT".into());
        };
        self.protocol = Some(protocol);
        self.source = format!("mqtt:{client_id}");
        self.client_id = client_id;
        self.producer = password.and_then(|p| self.config.gate.authenticate(&p));
        self.connack(self.producer.is_some())?;
        self.flush().await?;
        if self.producer.is_none() {
            return Err("refused: wrong or missing password".into());
        }
        // Keep alive 0 means none; we still close connections idle for an hour.
        let idle = if keep_alive == 0 {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(u64::from(keep_alive) * 1500)
        };
        // One timer for the keep-alive, moved only when it fires: a timer per packet would
        // cost more than the packet.
        let mut last_packet = tokio::time::Instant::now();
        let keep_alive = tokio::time::sleep(idle);
        tokio::pin!(keep_alive);
        loop {
            let can_read = self.in_flight.len() < usize::from(self.config.in_flight_max);
            let step = {
                let reader = &mut self.reader;
                let buffer = &mut self.buffer;
                let in_flight = &mut self.in_flight;
                let max = self.config.packet_bytes_max;
                tokio::select! {
                    read = read_packet(reader, buffer, Some(protocol), max), if can_read => Step::Read(read),
                    stored = async { (&mut in_flight.front_mut().expect("guarded").stored).await }, if !in_flight.is_empty() => Step::Stored(stored),
                    () = &mut keep_alive => Step::Idle,
                }
            };
            match step {
                Step::Idle => {
                    if last_packet.elapsed() >= idle {
                        return Err("no packet within 1.5 × the keep-alive".into());
                    }
                    keep_alive.as_mut().reset(last_packet + idle);
                }
                Step::Read(read) => {
                    last_packet = tokio::time::Instant::now();
                    match self.after_read(read).await? {
                        Packet::Publish {
                            qos,
                            pkid,
                            topic,
                            topic_alias,
                            content_type,
                            payload,
                        } => {
                            self.publish(qos, pkid, topic, topic_alias, content_type, payload)
                                .await?;
                        }
                        Packet::PingReq => {
                            match protocol {
                                Protocol::V4 => v4::PingResp.write(&mut self.out),
                                Protocol::V5 => v5::PingResp.write(&mut self.out),
                            }
                            .map_err(|e| format!("encode: {e:?}"))?;
                        }
                        Packet::Subscribe { pkid, filters } => {
                            self.refuse_subscribe(pkid, filters)?
                        }
                        Packet::Unsubscribe { pkid, filters } => {
                            match protocol {
                                Protocol::V4 => v4::UnsubAck::new(pkid).write(&mut self.out),
                                Protocol::V5 => {
                                    let mut ack = v5::UnsubAck::new(pkid);
                                    ack.reasons =
                                        vec![v5::UnsubAckReason::NoSubscriptionExisted; filters];
                                    ack.write(&mut self.out)
                                }
                            }
                            .map_err(|e| format!("encode: {e:?}"))?;
                        }
                        Packet::Disconnect => {
                            // Finish storing and acknowledging what came before.
                            while !self.in_flight.is_empty() {
                                self.finish_front().await?;
                            }
                            self.flush().await?;
                            return Ok(());
                        }
                        Packet::Connect { .. } => {
                            self.disconnect(v5::DisconnectReasonCode::ProtocolError)
                                .await;
                            return Err("a second CONNECT".into());
                        }
                        Packet::Ignored => {}
                    }
                }
                Step::Stored(stored) => {
                    let front = self.in_flight.pop_front().expect("guarded");
                    self.acknowledge(front, stored.map(|_| ())).await?;
                }
            }
            self.flush().await?;
        }
    }

    async fn finish_front(&mut self) -> Result<(), String> {
        let mut front = self.in_flight.pop_front().expect("caller checks");
        let stored = (&mut front.stored).await.map(|_| ());
        self.acknowledge(front, stored).await
    }

    async fn acknowledge(&mut self, done: InFlight, stored: Stored) -> Result<(), String> {
        if matches!(stored, Err(AppendError::Closed(_))) {
            self.routes.clear();
        }
        match (stored, done.qos) {
            (Ok(()), QoS::AtLeastOnce) => self.puback(done.pkid, v5::PubAckReason::Success),
            (Ok(()), _) => Ok(()),
            (Err(error), QoS::AtLeastOnce) => {
                if self.protocol == Some(Protocol::V5) {
                    self.puback(done.pkid, v5::PubAckReason::UnspecifiedError)?;
                    tracing::warn!(client = self.client_id, %error, "mqtt publish not stored");
                    Ok(())
                } else {
                    Err(format!("publish {} not stored: {error}", done.pkid))
                }
            }
            (Err(error), _) => {
                tracing::warn!(client = self.client_id, %error, "mqtt QoS 0 publish dropped");
                Ok(())
            }
        }
    }

    fn connack(&mut self, authorised: bool) -> Result<(), String> {
        match self.protocol {
            Some(Protocol::V4) => {
                let code = if authorised {
                    v4::ConnectReturnCode::Success
                } else {
                    v4::ConnectReturnCode::BadUserNamePassword
                };
                v4::ConnAck::new(code, false).write(&mut self.out)
            }
            _ => {
                let code = if authorised {
                    v5::ConnectReturnCode::Success
                } else {
                    v5::ConnectReturnCode::BadUserNamePassword
                };
                let mut ack = v5::ConnAck::new(code, false);
                let mut properties = v5::ConnAckProperties::new();
                properties.receive_max = Some(self.config.in_flight_max);
                properties.max_qos = Some(1);
                properties.retain_available = Some(0);
                properties.max_packet_size =
                    Some(u32::try_from(self.config.packet_bytes_max).unwrap_or(u32::MAX));
                properties.topic_alias_max = Some(ALIASES_MAX);
                properties.wildcard_subscription_available = Some(0);
                properties.subscription_identifiers_available = Some(0);
                properties.shared_subscription_available = Some(0);
                ack.properties = Some(properties);
                ack.write(&mut self.out)
            }
        }
        .map(|_| ())
        .map_err(|e| format!("encode: {e:?}"))
    }

    fn puback(&mut self, pkid: u16, reason: v5::PubAckReason) -> Result<(), String> {
        match self.protocol {
            Some(Protocol::V4) => v4::PubAck::new(pkid).write(&mut self.out),
            _ => {
                let mut ack = v5::PubAck::new(pkid);
                ack.reason = reason;
                ack.write(&mut self.out)
            }
        }
        .map(|_| ())
        .map_err(|e| format!("encode: {e:?}"))
    }

    fn refuse_subscribe(&mut self, pkid: u16, filters: usize) -> Result<(), String> {
        match self.protocol {
            Some(Protocol::V4) => {
                v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; filters])
                    .write(&mut self.out)
            }
            _ => v5::SubAck::new(pkid, vec![v5::SubscribeReasonCode::Unspecified; filters])
                .write(&mut self.out),
        }
        .map(|_| ())
        .map_err(|e| format!("encode: {e:?}"))
    }

    /// Refuse a publish: with a PUBACK reason on MQTT 5 (QoS 1), by closing on 3.1.1.
    async fn refuse(
        &mut self,
        qos: QoS,
        pkid: u16,
        reason: v5::PubAckReason,
        why: String,
    ) -> Result<(), String> {
        if self.protocol == Some(Protocol::V5) {
            // Earlier publishes are acknowledged first: PUBACKs keep the order.
            while !self.in_flight.is_empty() {
                self.finish_front().await?;
            }
            if qos == QoS::AtLeastOnce {
                self.puback(pkid, reason)?;
            }
            tracing::info!(client = self.client_id, %why, "mqtt publish refused");
            return Ok(());
        }
        if qos == QoS::AtMostOnce {
            tracing::info!(client = self.client_id, %why, "mqtt QoS 0 publish dropped");
            return Ok(());
        }
        while !self.in_flight.is_empty() {
            self.finish_front().await?;
        }
        self.flush().await?;
        Err(why)
    }

    async fn publish(
        &mut self,
        qos: QoS,
        pkid: u16,
        topic: String,
        topic_alias: Option<u16>,
        content_type: Option<String>,
        payload: Bytes,
    ) -> Result<(), String> {
        if qos == QoS::ExactlyOnce {
            self.disconnect(v5::DisconnectReasonCode::QoSNotSupported)
                .await;
            return Err("QoS 2 is not supported; publish with QoS 0 or 1".into());
        }
        let topic = match topic_alias {
            Some(alias) if alias == 0 || alias > ALIASES_MAX => {
                self.disconnect(v5::DisconnectReasonCode::TopicAliasInvalid)
                    .await;
                return Err(format!("topic alias {alias} is out of range"));
            }
            Some(alias) if topic.is_empty() => match self.aliases.get(&alias) {
                Some(topic) => topic.clone(),
                None => {
                    self.disconnect(v5::DisconnectReasonCode::ProtocolError)
                        .await;
                    return Err(format!("topic alias {alias} was never set"));
                }
            },
            Some(alias) => {
                self.aliases.insert(alias, topic.clone());
                topic
            }
            None => topic,
        };
        if topic.len() > MQTT_TOPIC_BYTES_MAX {
            let why = format!(
                "the topic name is {} bytes, longer than any declared topic and key ({MQTT_TOPIC_BYTES_MAX})",
                topic.len()
            );
            return self
                .refuse(qos, pkid, v5::PubAckReason::TopicNameInvalid, why)
                .await;
        }
        // A cached route was counted when it was first looked up; only a miss is hashed,
        // counted against the quota and looked up.
        let (target, key) = match self.routes.get(&topic) {
            Some(found) => found.clone(),
            None => {
                let hash = topic_hash(&topic);
                if !self.topics.contains(&hash)
                    && self.topics.len() >= self.config.topics_per_connection_max
                {
                    let why = format!(
                        "more than {} distinct topics on one connection",
                        self.config.topics_per_connection_max
                    );
                    return self
                        .refuse(qos, pkid, v5::PubAckReason::QuotaExceeded, why)
                        .await;
                }
                match self.events.route_mqtt(&topic) {
                    Ok(found) => {
                        // Only topics that route are remembered, and only so many.
                        self.topics.insert(hash);
                        if self.routes.len() < ROUTES_CACHED_MAX {
                            self.routes.insert(topic, found.clone());
                        }
                        found
                    }
                    Err(error) => {
                        // A declared topic that has not opened yet could not store the
                        // event (the producer may publish again); any other is unknown.
                        let reason = if error.is_transient() {
                            v5::PubAckReason::UnspecifiedError
                        } else {
                            v5::PubAckReason::TopicNameInvalid
                        };
                        return self.refuse(qos, pkid, reason, error.to_string()).await;
                    }
                }
            }
        };
        let producer = self.producer.clone().expect("publishes come after CONNECT");
        if let Err(why) = producer.admit(target.name(), self.peer).resolve().await {
            let why = format!(
                "{} may not publish to topic {}: {why}",
                producer.name(),
                target.name()
            );
            return self
                .refuse(qos, pkid, v5::PubAckReason::NotAuthorized, why)
                .await;
        }
        let event = NewEvent {
            key,
            content_type: content_type.unwrap_or_default(),
            kind: "maru.mqtt.publish".into(),
            source: self.source.clone(),
            payload,
        };
        let stored = target.append_soon(vec![event]);
        self.in_flight.push_back(InFlight { pkid, qos, stored });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::net::TcpStream;

    fn publish_v4(topic: &str, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        let mut publish = v4::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec());
        publish.pkid = 7;
        publish.write(&mut out).expect("encodes");
        out
    }

    fn connect(protocol: Protocol) -> BytesMut {
        let mut out = BytesMut::new();
        match protocol {
            Protocol::V4 => {
                let mut connect = v4::Connect::new("sensor-1");
                connect.set_login("u", "secret");
                connect.write(&mut out).expect("encodes");
            }
            Protocol::V5 => {
                let mut connect = v5::Connect::new("sensor-1");
                connect.set_login("u", "secret");
                connect.write(&mut out).expect("encodes");
            }
        }
        out
    }

    #[test]
    fn connect_decides_the_protocol() {
        for protocol in [Protocol::V4, Protocol::V5] {
            let mut bytes = connect(protocol);
            let packet = decode(None, &mut bytes, 1024).expect("valid");
            assert_eq!(
                packet,
                Some(Packet::Connect {
                    protocol,
                    client_id: "sensor-1".into(),
                    keep_alive: 10,
                    password: Some("secret".into()),
                })
            );
            assert!(bytes.is_empty());
        }
    }

    /// A listener with `connections_max = 1` and the token "t"; returns its address.
    async fn listener(
        dir: &std::path::Path,
        shutdown: &CancellationToken,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        listener_with(
            dir,
            shutdown,
            MqttConfig {
                gate: Gate::Token("t".into()),
                connections_max: 1,
                ..MqttConfig::default()
            },
        )
        .await
    }

    async fn listener_with(
        dir: &std::path::Path,
        shutdown: &CancellationToken,
        config: MqttConfig,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let events = Arc::new(Events::new(dir));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(serve(events, listener, config, None, shutdown.clone()));
        (address, server)
    }

    async fn connect_with(address: std::net::SocketAddr, password: &str) -> (TcpStream, Vec<u8>) {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let mut connect = v4::Connect::new("sensor-1");
        connect.set_login("u", password);
        let mut bytes = BytesMut::new();
        connect.write(&mut bytes).expect("encodes");
        stream.write_all(&bytes).await.expect("send");
        let mut answer = vec![0u8; 4];
        // A connection turned away unanswered is closed with the CONNECT unread, which the
        // kernel may report as a reset instead of an end of stream: both mean no answer.
        let read = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
            .await
            .expect("an answer within 5 s")
        {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => 0,
            other => other.expect("read"),
        };
        answer.truncate(read);
        (stream, answer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wrong_passwords_and_connections_over_the_limit_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let (address, server) = listener(dir.path(), &shutdown).await;
        let (_, refused) = connect_with(address, "wrong").await;
        assert_eq!(
            refused,
            [0x20, 2, 0, 4],
            "CONNACK: bad user name or password"
        );
        // The refused client's slot is freed when its connection task ends; until then a
        // new connection is turned away. Try for at most 5 s.
        let mut tries = 0;
        let _first = loop {
            let (stream, accepted) = connect_with(address, "t").await;
            if accepted == [0x20, 2, 0, 0] {
                break stream;
            }
            tries += 1;
            assert!(tries < 100, "never accepted: {accepted:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (_, over_limit) = connect_with(address, "t").await;
        assert!(
            over_limit.is_empty(),
            "the second connection is closed unanswered"
        );
        shutdown.cancel();
        server.await.expect("listener stops");
    }

    /// Hardening defect 6: idle connections that never send CONNECT could hold every slot
    /// for 10 s each, and from one address. Now one address has a cap of its own and a
    /// silent connection is closed after the CONNECT deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_address_cannot_hold_every_slot_and_silent_connections_are_closed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shutdown = CancellationToken::new();
        let (address, server) = listener_with(
            dir.path(),
            &shutdown,
            MqttConfig {
                gate: Gate::Token("t".into()),
                connections_max: 100,
                connections_per_address_max: 2,
                connect_timeout: Duration::from_millis(300),
                ..MqttConfig::default()
            },
        )
        .await;
        let (_first, accepted) = connect_with(address, "t").await;
        assert_eq!(accepted, [0x20, 2, 0, 0]);
        let (_second, accepted) = connect_with(address, "t").await;
        assert_eq!(accepted, [0x20, 2, 0, 0]);
        let (_, refused) = connect_with(address, "t").await;
        assert!(
            refused.is_empty(),
            "a third connection from one address is refused"
        );
        drop((_first, _second));
        // A connection that sends nothing is closed at the CONNECT deadline (bounded wait:
        // the read ends with the close, long before the 10 s guard).
        let mut silent = loop {
            let (stream, answer) = connect_with(address, "t").await;
            if answer == [0x20, 2, 0, 0] {
                drop(stream);
                break TcpStream::connect(address).await.expect("connect");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut byte))
            .await
            .expect("closed before the guard");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        shutdown.cancel();
        server.await.expect("listener stops");
    }

    #[test]
    fn publish_before_connect_is_refused() {
        let mut bytes = publish_v4("a/b", b"x");
        assert_eq!(decode(None, &mut bytes, 1024), Err(DecodeError::NotConnect));
    }

    #[test]
    fn oversized_packets_are_refused_before_they_are_read() {
        let mut bytes = publish_v4("a/b", &[0; 2000]);
        bytes.truncate(10);
        assert!(matches!(
            decode(Some(Protocol::V4), &mut bytes, 1024),
            Err(DecodeError::TooLarge(_))
        ));
    }

    proptest! {
        /// Any bytes, in any protocol state: a packet, a request for more, or an error;
        /// never a panic, and never a packet out of nothing.
        #[test]
        fn decoding_garbage_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            state in 0..3u8,
        ) {
            let protocol = [None, Some(Protocol::V4), Some(Protocol::V5)][state as usize];
            let mut buffer = BytesMut::from(&bytes[..]);
            for _ in 0..50 {
                match decode(protocol, &mut buffer, 1024) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Valid packets with bytes changed or cut: never a panic.
        #[test]
        fn damaged_packets_never_panic(
            protocol in prop_oneof![Just(Protocol::V4), Just(Protocol::V5)],
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = connect(protocol);
            match protocol {
                Protocol::V4 => bytes.extend_from_slice(&publish_v4("city/traffic/loop-17", b"{\"count\":12}")),
                Protocol::V5 => {
                    let mut publish = v5::Publish::new("city/traffic/loop-17", QoS::AtLeastOnce, b"{}".to_vec());
                    publish.pkid = 3;
                    publish.write(&mut bytes).expect("encodes");
                }
            }
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            let cut = cut.index(bytes.len() + 1);
            bytes.truncate(cut);
            let mut state = None;
            for _ in 0..10 {
                match decode(state, &mut bytes, 1024) {
                    Ok(Some(Packet::Connect { protocol, .. })) => state = Some(protocol),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
