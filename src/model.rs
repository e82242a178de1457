//! The vocabulary of Baton: sessions, interactions, events, statuses, policies and the
//! validated identifiers that name them. These types serialise exactly to the wire contract.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// A JSON object: the shape of a session's context and an interaction's metadata.
pub type JsonObject = Map<String, Value>;

/// Why an identifier, policy or other wire value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidValue(pub String);

/// A tenant: 1–64 characters of `[a-z0-9_-]`. Every session belongs to exactly one; with
/// access control off, every request acts as [`Tenant::DEFAULT`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Tenant(Arc<str>);

impl Tenant {
    /// The tenant of every request when access control is off, and of data stored before
    /// tenants existed.
    pub const DEFAULT: &'static str = "default";
    /// Longest accepted name, in characters.
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if valid {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidValue(
                "a tenant must be 1-64 characters of [a-z0-9_-]".into(),
            ))
        }
    }

    /// [`Tenant::DEFAULT`].
    pub fn default_tenant() -> Self {
        Self(Arc::from(Self::DEFAULT))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session of one tenant: the tenant and the session's name (1–128 characters of
/// `[A-Za-z0-9._:-]`, what clients call the session id). Tenant A's `demo` and tenant B's
/// `demo` are two different `SessionId`s, so nothing keyed by it (the store's rows, the bus,
/// the task registry) can mix them. It serialises as the name alone: the wire never shows the
/// tenant.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId {
    /// `tenant/name`: a `/` occurs in neither part, so the key is unambiguous. It is what
    /// the stores keep in their session columns.
    key: Arc<str>,
    /// Where the name starts in `key`.
    name_at: u8,
}

impl SessionId {
    /// Longest accepted name, in characters.
    pub const MAX_LEN: usize = 128;

    /// The session `name` of `tenant`, validated exactly as written (no percent-decoding
    /// happens here).
    pub fn new(tenant: &Tenant, name: &str) -> Result<Self, InvalidValue> {
        validate_session_name(name)?;
        let key = format!("{tenant}/{name}");
        Ok(Self {
            key: Arc::from(key),
            name_at: (tenant.as_str().len() + 1) as u8,
        })
    }

    /// Rebuilds an id from [`SessionId::key`] (as the stores keep it).
    pub fn from_key(key: &str) -> Result<Self, InvalidValue> {
        let (tenant, name) = key
            .split_once('/')
            .ok_or_else(|| InvalidValue(format!("{key:?} is not a session key")))?;
        Self::new(&Tenant::parse(tenant)?, name)
    }

    /// The name clients use (the `{id}` of the routes).
    pub fn name(&self) -> &str {
        &self.key[usize::from(self.name_at)..]
    }

    /// The tenant's name.
    pub fn tenant(&self) -> &str {
        &self.key[..usize::from(self.name_at) - 1]
    }

    /// `tenant/name`: the form the stores keep.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// Checks a session name: 1–128 characters of `[A-Za-z0-9._:-]`.
pub fn validate_session_name(raw: &str) -> Result<(), InvalidValue> {
    let valid = !raw.is_empty()
        && raw.len() <= SessionId::MAX_LEN
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(InvalidValue(
            "session id must be 1-128 characters of [A-Za-z0-9._:-]".into(),
        ))
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// An interaction id: a UUIDv7 in its hyphenated text form, so ids sort by creation time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct InteractionId(Arc<str>);

impl InteractionId {
    /// Accepts only the canonical lower-case hyphenated UUID form Baton generates.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let ok = raw.len() == 36
            && raw.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
            });
        if ok {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidValue(format!("{raw:?} is not an interaction id")))
        }
    }

    /// Wraps a value read back from the store, which only ever holds generated ids.
    pub(crate) fn from_stored(raw: String) -> Self {
        Self(Arc::from(raw))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InteractionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Generates interaction ids that are strictly increasing within this process, even when
/// many are made in the same millisecond (UUIDv7 with a counter in the random bits).
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: u128,
}

impl IdGenerator {
    pub fn next_id(&mut self) -> InteractionId {
        let fresh = uuid::Uuid::now_v7().as_u128();
        // Same millisecond (or a clock step back): continue after the last id instead.
        let value = if fresh > self.last {
            fresh
        } else {
            self.last + 1
        };
        self.last = value;
        let id = uuid::Uuid::from_u128(value).hyphenated().to_string();
        InteractionId(Arc::from(id))
    }

    /// An id greater than `floor` (one stored earlier, maybe by another node), whatever this
    /// node's clock says.
    pub fn next_after(&mut self, floor: &InteractionId) -> InteractionId {
        if let Ok(stored) = uuid::Uuid::parse_str(floor.as_str()) {
            self.last = self.last.max(stored.as_u128());
        }
        self.next_id()
    }
}

/// Milliseconds since the Unix epoch: how instants are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Millis(pub i64);

impl Millis {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Self(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-28T08:00:00.123Z`.
    pub fn to_rfc3339(self) -> String {
        let text = self.rfc3339();
        String::from_utf8_lossy(&text).into_owned()
    }

    /// [`Millis::to_rfc3339`] without an allocation: every event's envelope carries one, and
    /// envelopes are made on the store's one writer. Years outside 0..=9999 are clamped.
    fn rfc3339(self) -> [u8; 24] {
        let ms = self.0.rem_euclid(1000);
        let secs = self.0.div_euclid(1000);
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        let mut out = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, width: usize, mut value: i64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, y.clamp(0, 9999));
        put(5, 2, i64::from(m));
        put(8, 2, i64::from(d));
        put(11, 2, sod / 3600);
        put(14, 2, (sod / 60) % 60);
        put(17, 2, sod % 60);
        put(20, 3, ms);
        out
    }
}

impl Millis {
    /// Parses the UTC form [`Millis::to_rfc3339`] writes (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
    pub fn parse_rfc3339(text: &str) -> Option<Self> {
        let b = text.as_bytes();
        if b.len() != 24
            || b[4] != b'-'
            || b[7] != b'-'
            || b[10] != b'T'
            || b[19] != b'.'
            || b[23] != b'Z'
        {
            return None;
        }
        let num = |range: std::ops::Range<usize>| -> Option<i64> { text.get(range)?.parse().ok() };
        let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
        let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
        // Days from civil (Howard Hinnant), the inverse of `civil_from_days`.
        let y = if m <= 2 { y - 1 } else { y };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = (m + 9) % 12;
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        Some(Millis(
            ((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1000) + ms,
        ))
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text = self.rfc3339();
        // Only ASCII digits and separators were written.
        s.serialize_str(std::str::from_utf8(&text).unwrap_or("1970-01-01T00:00:00.000Z"))
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Defines a string-valued wire enum with `as_str`, `FromStr`, `Display` and serde.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident ($label:literal) { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(InvalidValue(format!(
                        concat!("{:?} is not a valid ", $label, "; expected one of: {}"),
                        s,
                        [$($text),+].join(", ")
                    ))),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

wire_enum! {
    /// The life cycle of an interaction. The last three are final: nothing changes after them.
    Status ("status") {
        Queued = "queued",
        Running = "running",
        /// Active, but nothing runs: its agent asked the client something (`request`).
        Waiting = "waiting",
        Completed = "completed",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

impl Status {
    pub fn is_final(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// `running` or `waiting`: at most one interaction of a session is active (I1).
    pub fn is_active(self) -> bool {
        matches!(self, Status::Running | Status::Waiting)
    }
}

/// What a `waiting` interaction's agent asked: `id` assigned by Baton, `data` the agent's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingRequest {
    pub id: String,
    pub data: Value,
}

/// A request of an interaction's agent and the answer it got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub request: PendingRequest,
    pub answer: Value,
}

wire_enum! {
    /// What to do with a message that arrives while the session is busy.
    Policy ("policy") {
        /// `409 session_busy`; nothing stored.
        Reject = "reject",
        /// Stored as `queued` behind the others, up to `queue_limit`.
        Enqueue = "enqueue",
        /// Cancel the running and queued ones and start this one, atomically.
        Interrupt = "interrupt",
    }
}

// The enum is generated by `wire_enum!`, which cannot carry `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for Policy {
    fn default() -> Self {
        Policy::Reject
    }
}

wire_enum! {
    /// Why an interaction was cancelled.
    CancelReason ("cancel reason") {
        Cancel = "cancel",
        Clear = "clear",
        Interrupt = "interrupt",
        Timeout = "timeout",
        Shutdown = "shutdown",
        Delete = "delete",
    }
}

/// An error attached to a failed interaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// One request to the agent and its outcome, exactly as the wire contract shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interaction {
    pub id: InteractionId,
    pub session: SessionId,
    pub content: String,
    pub metadata: JsonObject,
    pub status: Status,
    pub response: String,
    pub error: Option<ErrorInfo>,
    /// While `waiting`: the pending request; `null` otherwise.
    pub request: Option<PendingRequest>,
    /// Every earlier request of this interaction's agent with its answer, in order (left out
    /// when the agent never asked).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub answers: Vec<Exchange>,
    pub cancel_reason: Option<CancelReason>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// While `waiting`: when it is cancelled (`timeout`) unless answered.
    #[serde(skip)]
    pub input_deadline: Option<Millis>,
}

/// A session as the wire contract shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Session {
    pub id: SessionId,
    pub agent: String,
    pub context: JsonObject,
    pub epoch: i64,
    pub last_seq: i64,
    pub created_at: Millis,
    pub running: Option<Interaction>,
    pub queued: i64,
}

wire_enum! {
    /// The type of an event in a session's log.
    EventType ("event type") {
        SessionCreated = "session.created",
        InteractionQueued = "interaction.queued",
        TaskStarted = "task.started",
        TaskDelta = "task.delta",
        TaskProgress = "task.progress",
        TaskWaiting = "task.waiting",
        TaskResumed = "task.resumed",
        TaskCompleted = "task.completed",
        TaskFailed = "task.failed",
        TaskCancelled = "task.cancelled",
        ContextUpdated = "context.updated",
        SessionCleared = "session.cleared",
        SessionDeleted = "session.deleted",
    }
}

impl EventType {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            EventType::TaskCompleted | EventType::TaskFailed | EventType::TaskCancelled
        )
    }

    /// The final event type for an interaction that reached `status`.
    pub fn final_for(status: Status) -> Option<Self> {
        match status {
            Status::Completed => Some(EventType::TaskCompleted),
            Status::Failed => Some(EventType::TaskFailed),
            Status::Cancelled => Some(EventType::TaskCancelled),
            Status::Queued | Status::Running | Status::Waiting => None,
        }
    }
}

/// A committed event of a session's log. The envelope is serialised once, when the event is
/// made, and shared by the store, every subscriber and every replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub session: SessionId,
    pub seq: i64,
    pub kind: EventType,
    /// The interaction this event is about, if any (used to route waiters and fencing).
    pub interaction_id: Option<InteractionId>,
    /// `{"seq","session","type","at","data"}` as JSON text.
    pub envelope: Arc<str>,
    /// The interaction carried by `interaction.queued`, `task.started` and final events, so
    /// waiters need no read of the store.
    pub interaction: Option<Arc<Interaction>>,
}

impl Event {
    /// Builds the envelope text for an event.
    pub fn new(
        session: &SessionId,
        seq: i64,
        kind: EventType,
        at: Millis,
        interaction_id: Option<InteractionId>,
        data: &impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        #[derive(Serialize)]
        struct Envelope<'a, D: Serialize> {
            seq: i64,
            session: &'a SessionId,
            #[serde(rename = "type")]
            kind: EventType,
            at: Millis,
            data: &'a D,
        }
        let text = serde_json::to_string(&Envelope {
            seq,
            session,
            kind,
            at,
            data,
        })?;
        Ok(Self {
            session: session.clone(),
            seq,
            kind,
            interaction_id,
            envelope: Arc::from(text),
            interaction: None,
        })
    }
}

/// Applies an RFC 7396 JSON Merge Patch to `target` in place.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Validates an `Idempotency-Key`: 1–255 printable ASCII characters.
pub fn validate_idempotency_key(key: &str) -> Result<(), InvalidValue> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err(InvalidValue(
            "idempotency key must be 1-255 printable ASCII characters".into(),
        ))
    }
}

/// Decodes `%XX` escapes (and nothing else: a `+` in a path is a `+`); `None` when an escape
/// is malformed or the result is not UTF-8. Paths and query strings of the API and the
/// PostgreSQL URL's options both read through it.
pub fn percent_decode(raw: &str) -> Option<String> {
    if !raw.contains('%') {
        return Some(raw.to_string());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(Millis(0).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            Millis(1_795_852_800_123).to_rfc3339(),
            "2026-11-28T08:00:00.123Z"
        );
        assert_eq!(
            Millis(951_782_400_000).to_rfc3339(),
            "2000-02-29T00:00:00.000Z"
        );
        for ms in [0, 951_782_400_000, 1_795_852_800_123, 1_709_251_199_999] {
            assert_eq!(
                Millis::parse_rfc3339(&Millis(ms).to_rfc3339()),
                Some(Millis(ms))
            );
        }
        assert_eq!(Millis::parse_rfc3339("2026-11-28 08:00:00.123Z"), None);
    }

    #[test]
    fn session_ids_are_checked_raw() {
        let t = Tenant::default_tenant();
        assert!(SessionId::new(&t, "a.b_c:d-E9").is_ok());
        assert!(SessionId::new(&t, &"x".repeat(128)).is_ok());
        for bad in ["", "a/b", "a%2Fb", "é", "a b", &"x".repeat(129)] {
            assert!(SessionId::new(&t, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn generated_ids_strictly_increase() {
        let mut g = IdGenerator::default();
        let mut last = g.next_id();
        for _ in 0..10_000 {
            let id = g.next_id();
            assert!(id > last);
            assert!(InteractionId::parse(id.as_str()).is_ok());
            last = id;
        }
    }

    #[test]
    fn merge_patch_follows_rfc7396() {
        let mut target = serde_json::json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(
            &mut target,
            &serde_json::json!({"a": "z", "c": {"f": null}, "n": [1]}),
        );
        assert_eq!(
            target,
            serde_json::json!({"a": "z", "c": {"d": "e"}, "n": [1]})
        );
    }
}
