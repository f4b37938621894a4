//! One module per operation, and the table that dispatches over them.
//!
//! Each operation's module holds everything about it (mini-redis's
//! `cmd/*.rs` is the model): its request type and Cap'n Proto request arm,
//! its reply type and response arm ([`Operation`]), and, with the `server`
//! feature, its limits, its routing and its mapping onto store commands
//! ([`Serve`]). The [`operations!`] table at the bottom generates [`Op`] and
//! [`Reply`] and every match over operations from one line per operation,
//! so adding one means: the schema arm, a module, a `mod` line and a table
//! line here, the store's semantics, tests (docs/architecture.md, "How to
//! add an operation").
//!
//! Every generated match is exhaustive and every trait method is required:
//! the compiler asks a new operation for its codec, its limits, its route
//! and its store mapping; its durability is asked by
//! [`Command::needs_sync`](crate::storage::Command::needs_sync).

use crate::protocol::{ErrorReply, ResponseDecodeError};
use crate::queueber_capnp::{request, response};

pub(crate) mod fields;

pub mod add;
pub mod auth;
pub mod create_queue;
pub mod delete;
pub mod extend;
pub mod fail;
pub mod get_policy;
pub mod hello;
pub mod list_queues;
pub mod peek;
pub mod poll;
pub mod purge;
pub mod redrive;
pub mod release;
pub mod remove;
pub mod remove_and_poll;
pub use remove_and_poll::RemovedAndPolled;
pub mod set_policy;
pub mod stats;

/// What an operation is on the wire: both directions of its codec.
pub trait Operation: Sized {
    /// The operation's name in the schema, logs and error messages.
    const NAME: &'static str;
    /// What a successful request answers.
    type Reply;
    /// This operation's arm of the `Request` union, as the generated reader
    /// yields it.
    type RequestArm<'a>;
    /// This operation's arm of the `Response` union.
    type ResponseArm<'a>;

    /// Reads the request; checks what needs no server configuration
    /// (names, id lengths).
    fn decode(arm: Self::RequestArm<'_>) -> Result<Self, ErrorReply>;
    /// Writes the request into `root` (whose id is already set).
    fn encode(&self, root: request::Builder<'_>);
    /// Writes a successful answer into `root` (whose id is already set).
    fn encode_reply(reply: &Self::Reply, root: response::Builder<'_>);
    /// About how many 8-byte words the encoded answer takes: the size of
    /// the message's first segment. capnp zeroes a segment when it is
    /// allocated, so a small answer should not get its default 8 KiB; an
    /// underestimate only costs another segment.
    fn reply_words(_reply: &Self::Reply) -> u32 {
        SMALL_REPLY_WORDS
    }
    /// Reads a successful answer (client side).
    fn decode_reply(arm: Self::ResponseArm<'_>) -> Result<Self::Reply, ResponseDecodeError>;
}

/// First segment of an answer without payloads (ids, flags, counters, an
/// error's message): 512 bytes.
pub const SMALL_REPLY_WORDS: u32 = 64;

/// First segment of an answer carrying `deliveries`: each message's payload
/// and its fixed fields (id, counters, pointers: 8 words with room to spare).
pub(crate) fn deliveries_words(deliveries: &[crate::types::Delivery]) -> u32 {
    let words: usize = deliveries.iter().map(|d| d.payload.len().div_ceil(8) + 8).sum();
    u32::try_from(words)
        .unwrap_or(u32::MAX)
        .saturating_add(SMALL_REPLY_WORDS)
}

/// Ties an operation to its variants of [`Op`] and [`Reply`]; implemented
/// by the table, for typed calls (`Client::send`).
pub trait Dispatch: Operation + Into<Op> {
    /// The reply as this operation's own type, or the reply back when the
    /// server answered something else.
    // The error hands the whole reply back (a server that answered another
    // operation, a cold path); boxing it would cost every call instead.
    #[allow(clippy::result_large_err)]
    fn reply_of(reply: Reply) -> Result<Self::Reply, Reply>;
    fn wrap_reply(reply: Self::Reply) -> Reply;
}

#[cfg(feature = "server")]
pub use serve::{Outcomes, Plan, ReplyFn, Route, Serve};

#[cfg(feature = "server")]
mod serve {
    use super::{Dispatch, Operation, Reply};
    use crate::names::QueueName;
    use crate::protocol::{ErrorCode, ErrorReply};
    use crate::server::ServerLimits;
    use crate::storage::{Command, Outcome};

    /// The outcomes of one operation's store commands, in the order its
    /// [`Serve::plan`] pushed them (a storage failure of the batch repeats
    /// for each).
    pub type Outcomes<'a> = dyn Iterator<Item = Result<Outcome, ErrorReply>> + 'a;

    /// Builds one operation's [`Reply`] from its outcomes.
    pub type ReplyFn = fn(&mut Outcomes<'_>) -> Result<Reply, ErrorReply>;

    /// Where a request runs.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Route<'a> {
        /// Answered by the connection that read it; never reaches a shard.
        Connection,
        /// Run by the shard that owns this queue (its one writer).
        Owner(&'a QueueName),
        /// Run by the connection's own shard: it reads state every shard
        /// shares (the queue registry).
        Local,
    }

    /// How the shard core runs a planned operation.
    #[derive(Debug)]
    pub enum Plan {
        /// This many store commands were pushed into the batch; the reply
        /// is built from their outcomes by [`Serve::reply`].
        Commands(usize),
        /// A poll: run by the core against the caller's reply room, and
        /// parked while it finds nothing and may wait.
        Poll(super::poll::Poll),
        /// `removes` store commands were pushed into the batch; the core
        /// adds one attempt of `poll` (never parked: the connection waits
        /// with a plain poll if it must) and answers both.
        RemoveThenPoll { removes: usize, poll: super::poll::Poll },
        /// Answered by the connection ([`Route::Connection`]); a shard that
        /// is handed one answers `internal`.
        Connection,
    }

    /// What the server does with an operation. Every method is required,
    /// so a new operation must state each.
    pub trait Serve: Operation {
        /// Checks the request against the server's limits and normalises
        /// what the protocol defines as defaulted or capped. Each check has
        /// one owner: what the store must hold whoever calls it (payload
        /// size, duration clamps) the store checks, not this.
        fn admit(self, limits: &ServerLimits) -> Result<Self, ErrorReply>;
        /// Which shard runs it.
        fn route(&self) -> Route<'_>;
        /// What a token must grant for it (on a server with `--auth-file`);
        /// `None`: open to every connection (`hello`, `auth`).
        fn permission(&self) -> Option<crate::auth::Permission>;
        /// Messages it writes that a flood could repeat without bound. A
        /// shard takes at most a fixed number of these per batch (and per
        /// connection while others wait), deferring the rest, so no
        /// producer can make a batch, and everything answered with it,
        /// arbitrarily long. 0: runs in the next batch, whatever waits.
        fn batch_writes(&self) -> usize;
        /// Pushes its store commands into the batch being built.
        fn plan(self, commands: &mut Vec<Command>) -> Plan;
        /// Its answer, from the outcomes of the commands `plan` pushed.
        fn reply(outcomes: &mut Outcomes<'_>) -> Result<Self::Reply, ErrorReply>;
    }

    /// [`Serve::reply`] as a [`Reply`], for the core's finish list.
    pub(super) fn reply_fn<T: Serve + Dispatch>(outcomes: &mut Outcomes<'_>) -> Result<Reply, ErrorReply> {
        T::reply(outcomes).map(T::wrap_reply)
    }

    /// The one outcome of a single-command operation, picked by `pick`
    /// (which hands back an outcome of the wrong kind).
    pub(crate) fn one<T>(
        outcomes: &mut Outcomes<'_>,
        op: &'static str,
        pick: fn(Outcome) -> Result<T, Outcome>,
    ) -> Result<T, ErrorReply> {
        match outcomes.next() {
            Some(Ok(outcome)) => pick(outcome).map_err(|other| wrong_outcome(op, &other)),
            Some(Err(e)) => Err(e),
            None => Err(missing_outcome(op)),
        }
    }

    pub(crate) fn wrong_outcome(op: &'static str, outcome: &Outcome) -> ErrorReply {
        ErrorReply::new(ErrorCode::Internal, format!("the store answered {op} with {outcome:?}"))
    }

    pub(crate) fn missing_outcome(op: &'static str) -> ErrorReply {
        ErrorReply::new(
            ErrorCode::Unavailable,
            format!("the store returned no outcome for {op}"),
        )
    }
}

#[cfg(feature = "server")]
pub(crate) use serve::{missing_outcome, one, wrong_outcome};

/// The dispatch table: `Variant(module::Type) -> ReplyVariant`. Generates
/// [`Op`], [`Reply`], the conversions between them and each operation, and
/// every match over operations.
macro_rules! operations {
    ($( $variant:ident($module:ident::$ty:ident) -> $answer:ident, )*) => {
        $( pub use $module::$ty; )*

        /// One operation a client can ask for.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Op {
            $( $variant($ty), )*
        }

        /// The position of each operation in the table.
        #[allow(dead_code)]
        enum Position {
            $( $variant, )*
        }

        impl Op {
            /// Every operation's name, in table order ([`Op::index`]).
            pub const NAMES: &'static [&'static str] = &[$( <$ty as Operation>::NAME, )*];

            /// The operation's position in the table: a dense index for
            /// per-operation counters.
            pub fn index(&self) -> usize {
                match self {
                    $( Op::$variant(_) => Position::$variant as usize, )*
                }
            }
        }

        /// A successful answer.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Reply {
            $( $answer(<$ty as Operation>::Reply), )*
        }

        $(
            impl From<$ty> for Op {
                fn from(op: $ty) -> Op {
                    Op::$variant(op)
                }
            }

            impl Dispatch for $ty {
                fn reply_of(reply: Reply) -> Result<Self::Reply, Reply> {
                    match reply {
                        Reply::$answer(r) => Ok(r),
                        other => Err(other),
                    }
                }

                fn wrap_reply(reply: Self::Reply) -> Reply {
                    Reply::$answer(reply)
                }
            }
        )*

        impl Op {
            /// The operation's name, as in the schema.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Op::$variant(_) => <$ty as Operation>::NAME, )*
                }
            }

            pub(crate) fn decode(which: request::WhichReader<'_>) -> Result<Op, ErrorReply> {
                match which {
                    $( request::Which::$variant(arm) => <$ty as Operation>::decode(arm).map(Op::$variant), )*
                }
            }

            pub(crate) fn encode(&self, root: request::Builder<'_>) {
                match self {
                    $( Op::$variant(op) => op.encode(root), )*
                }
            }
        }

        impl Reply {
            pub(crate) fn encode(&self, root: response::Builder<'_>) {
                match self {
                    $( Reply::$answer(r) => <$ty as Operation>::encode_reply(r, root), )*
                }
            }

            /// The first segment's size for this answer
            /// ([`Operation::reply_words`]).
            pub(crate) fn words(&self) -> u32 {
                match self {
                    $( Reply::$answer(r) => <$ty as Operation>::reply_words(r), )*
                }
            }

            /// Reads a response's result: the reply of its arm, or the
            /// server's typed error.
            pub(crate) fn decode(
                which: response::WhichReader<'_>,
            ) -> Result<Result<Reply, ErrorReply>, ResponseDecodeError> {
                Ok(match which {
                    response::Which::Error(e) => Err(fields::read_error(e)?),
                    $( response::Which::$variant(arm) => Ok(Reply::$answer(<$ty as Operation>::decode_reply(arm)?)), )*
                })
            }
        }

        #[cfg(feature = "server")]
        impl Op {
            /// [`Serve::admit`] of the operation.
            pub fn admit(self, limits: &crate::server::ServerLimits) -> Result<Op, ErrorReply> {
                match self {
                    $( Op::$variant(op) => op.admit(limits).map(Op::$variant), )*
                }
            }

            /// [`Serve::route`] of the operation.
            pub fn route(&self) -> Route<'_> {
                match self {
                    $( Op::$variant(op) => op.route(), )*
                }
            }

            /// [`Serve::permission`] of the operation.
            pub fn permission(&self) -> Option<crate::auth::Permission> {
                match self {
                    $( Op::$variant(op) => op.permission(), )*
                }
            }

            /// [`Serve::batch_writes`] of the operation.
            pub fn batch_writes(&self) -> usize {
                match self {
                    $( Op::$variant(op) => op.batch_writes(), )*
                }
            }

            /// [`Serve::plan`] of the operation, with how its reply is built.
            pub fn plan(self, commands: &mut Vec<crate::storage::Command>) -> (Plan, ReplyFn) {
                match self {
                    $( Op::$variant(op) => (op.plan(commands), serve::reply_fn::<$ty>), )*
                }
            }
        }
    };
}

operations! {
    Hello(hello::Hello) -> Hello,
    Add(add::Add) -> Added,
    Poll(poll::Poll) -> Polled,
    Remove(remove::Remove) -> Removed,
    Extend(extend::Extend) -> Extended,
    Release(release::Release) -> Released,
    Stats(stats::Stats) -> Stats,
    ListQueues(list_queues::ListQueues) -> Queues,
    Purge(purge::Purge) -> Purged,
    Delete(delete::Delete) -> Deleted,
    Peek(peek::Peek) -> Peeked,
    Auth(auth::Auth) -> Authenticated,
    CreateQueue(create_queue::CreateQueue) -> QueueCreated,
    GetPolicy(get_policy::GetPolicy) -> Policy,
    SetPolicy(set_policy::SetPolicy) -> PolicySet,
    Fail(fail::Fail) -> Failed,
    Redrive(redrive::Redrive) -> Redriven,
    RemoveAndPoll(remove_and_poll::RemoveAndPoll) -> RemovedAndPolled,
}
