# queueber wire protocol. See docs/protocol.md for framing, semantics and limits.
#
# Every frame is one Cap'n Proto message in the standard stream framing
# (segment table, then segments; unpacked). A client sends `Request`s and the
# server answers each with exactly one `Response` carrying the same `id`.
# Responses may arrive in any order; many requests may be in flight at once.
@0xf994aea564931a8a;

struct QueueRef {
  # Empty tenant or queue means "default". Each is 1-128 bytes of [A-Za-z0-9._-].
  tenant @0 :Text;
  queue @1 :Text;
}

struct NewMessage {
  payload @0 :Data;
  delayMs @1 :UInt64;   # 0 = visible at once
}

struct Request {
  id @0 :UInt64;        # chosen by the client, echoed in the response
  union {
    hello @1 :Void;
    add @2 :AddRequest;
    poll @3 :PollRequest;
    remove @4 :RemoveRequest;
    extend @5 :ExtendRequest;
    release @6 :ReleaseRequest;
    stats @7 :QueueRef;
    listQueues @8 :Void;
    purge @9 :QueueRef;
    delete @10 :QueueRef;
    peek @11 :PeekRequest;
    auth @12 :AuthRequest;
    createQueue @13 :CreateQueueRequest;
    getPolicy @14 :QueueRef;
    setPolicy @15 :SetPolicyRequest;
    fail @16 :FailRequest;
    redrive @17 :RedriveRequest;
    removeAndPoll @18 :RemoveAndPollRequest;
  }
}

struct RemoveAndPollRequest {
  # A consumer's loop in one round trip: acknowledge what it finished, then
  # poll for more, on one queue. The removes run first, exactly as `remove`
  # would; then the poll, exactly as `poll` would (waiting included).
  queue @0 :QueueRef;
  lease @1 :Data;       # the lease `ids` were delivered under (16 bytes;
                        # may be empty when `ids` is)
  ids @2 :List(Data);   # to remove first (16 bytes each); may be empty
  maxItems @3 :UInt32;  # then the poll: as PollRequest
  leaseMs @4 :UInt64;
  waitMs @5 :UInt64;
}

struct FailRequest {
  queue @0 :QueueRef;
  lease @1 :Data;       # 16 bytes
  id @2 :Data;          # 16 bytes
  error @3 :Text;       # what went wrong (kept with the message, up to 1 KiB)
  dead @4 :Bool;        # dead-letter it at once (reason rejected)
}

struct RedriveRequest {
  queue @0 :QueueRef;
  max @1 :UInt64;       # most to move (0 = all); ignored when ids are given
  ids @2 :List(Data);   # these dead letters only (16 bytes each)
}

enum DeadReason {
  maxDeliveries @0;     # delivered maxDeliveries times without a remove
  rejected @1;          # a worker failed it with dead = true
}

struct DeadLetter {
  id @0 :Data;
  payload @1 :Data;
  deliveryCount @2 :UInt32;   # deliveries before it died
  enqueuedAtMs @3 :UInt64;
  diedAtMs @4 :UInt64;
  reason @5 :DeadReason;
  lastError @6 :Text;         # the last error a worker reported; empty if none
  hasError @7 :Bool;          # whether lastError was reported
}

struct QueuePolicy {
  # A queue's own settings; 0 in any field = unset (the server's default
  # applies). maxDepth and maxBytes: 0xFFFFFFFFFFFFFFFF = unlimited.
  leaseMs @0 :UInt64;         # the lease of a poll with leaseMs = 0
  maxDepth @1 :UInt64;        # most messages held (visible, delayed, in flight)
  maxBytes @2 :UInt64;        # most payload bytes held
  maxPayloadBytes @3 :UInt64; # largest payload (at most the server's limit)
  retryBackoffMs @4 :List(UInt64);
                              # after the n-th failed delivery (lease expired,
                              # or released without a delay) a message is
                              # visible again after the n-th step, the last
                              # repeating; at most 8 steps; empty = at once
  maxDeliveries @5 :UInt64;   # deliveries after which a message not removed is
                              # dead-lettered (1-1000, or all ones = unlimited)
  retentionMs @6 :UInt64;     # a message older than this (from its first add)
                              # is dropped, visible, delayed or dead; in flight,
                              # when its lease ends (all ones = kept forever)
}

struct CreateQueueRequest {
  queue @0 :QueueRef;
  policy @1 :QueuePolicy;
}

struct SetPolicyRequest {
  queue @0 :QueueRef;
  policy @1 :QueuePolicy;     # replaces the whole policy
}

struct PolicyReply {
  version @0 :UInt64;         # 0 until a policy is set; +1 with every change
  policy @1 :QueuePolicy;     # as stored
  effective @2 :QueuePolicy;  # every field set: the queue's, else the default
  created @3 :Bool;           # createQueue only: the queue is new
}

struct AddRequest {
  queue @0 :QueueRef;
  messages @1 :List(NewMessage);
}

struct PollRequest {
  queue @0 :QueueRef;
  maxItems @1 :UInt32;  # 0 means 1; capped by the server's limit
  leaseMs @2 :UInt64;   # 0 = the queue's policy's lease, else the server's default
  waitMs @3 :UInt64;    # 0 = answer at once; capped by the server's limit
}

struct AuthRequest {
  token @0 :Text;       # as `queueber token new` printed it: "<id>.<secret>"
}

struct PeekRequest {
  queue @0 :QueueRef;
  maxItems @1 :UInt32;  # 0 means 1; capped by the server's limit
  cursor @2 :Data;      # empty = from the head; else the cursor of the last reply
  dead @3 :Bool;        # the dead letters instead (oldest death first)
}

struct RemoveRequest {
  queue @0 :QueueRef;
  lease @1 :Data;       # 16 bytes
  ids @2 :List(Data);   # 16 bytes each; answered with one Bool each
}

struct ExtendRequest {
  queue @0 :QueueRef;
  lease @1 :Data;
  leaseMs @2 :UInt64;   # new expiry = now + leaseMs
}

struct ReleaseRequest {
  queue @0 :QueueRef;
  lease @1 :Data;
  id @2 :Data;
  delayMs @3 :UInt64;   # visible again after this delay
}

struct Response {
  id @0 :UInt64;
  union {
    error @1 :Error;
    hello @2 :HelloReply;
    add @3 :AddReply;
    poll @4 :PollReply;
    remove @5 :RemoveReply;
    extend @6 :ExtendReply;
    release @7 :ReleaseReply;
    stats @8 :QueueStats;
    listQueues @9 :List(QueueRef);
    purge @10 :PurgeReply;
    delete @11 :Void;
    peek @12 :PeekReply;
    auth @13 :AuthReply;
    createQueue @14 :PolicyReply;
    getPolicy @15 :PolicyReply;
    setPolicy @16 :PolicyReply;
    fail @17 :FailReply;
    redrive @18 :RedriveReply;
    removeAndPoll @19 :RemoveAndPollReply;
  }
}

struct RemoveAndPollReply {
  removed @0 :List(Bool);     # one per requested id, as RemoveReply
  poll @1 :PollReply;         # as the answer to poll (empty lease: nothing)
}

enum ErrorCode {
  internal @0;          # a server-side failure (storage); retry later
  invalidArgument @1;   # a number out of range, a malformed id, extend leaseMs = 0
  invalidName @2;       # tenant or queue name not 1-128 bytes of [A-Za-z0-9._-]
  unknownQueue @3;      # the queue does not exist (only add creates queues)
  payloadTooLarge @4;   # a message payload over the limit
  tooManyMessages @5;   # an add (or remove) with more entries than the limit
  frameTooLarge @6;     # the frame is over the limit; the connection closes
  malformedFrame @7;    # not a valid Request; closes the connection only when the
                        # segment table itself is invalid (framing is lost)
  unknownOperation @8;  # a valid frame with an operation this server lacks
  tooManyInFlight @9;   # more pipelined requests than the limit
  shuttingDown @10;     # the server is stopping; reconnect elsewhere or later
  unavailable @11;      # a shard cannot serve right now
  diskFull @12;         # the data filesystem is under its free-space reserve:
                        # adds are refused (retry later); everything else works
  unauthenticated @13;  # auth is required and this connection has not (or
                        # wrongly) presented a token; nothing was executed
  permissionDenied @14; # the connection's token does not allow this request
                        # (another tenant, a missing permission, a queue
                        # outside its patterns); nothing was executed
  queueFull @15;        # the add would take the queue past its maxDepth or
                        # maxBytes; nothing of it was stored
}

struct Error {
  code @0 :ErrorCode;
  message @1 :Text;     # human-readable; names the limit or argument
}

struct Limits {
  maxFrameBytes @0 :UInt64;
  maxMessagesPerAdd @1 :UInt32;
  maxPayloadBytes @2 :UInt64;
  maxItemsPerPoll @3 :UInt32;
  maxWaitMs @4 :UInt64;
  maxInFlightPerConnection @5 :UInt32;
  maxConnections @6 :UInt32;
  maxDurationMs @7 :UInt64;   # the longest lease, delay or extension
}

struct HelloReply {
  version @0 :Text;
  shards @1 :UInt32;
  limits @2 :Limits;
  diskFull @3 :Bool;          # adds are being refused for lack of disk space
  authRequired @4 :Bool;      # the server has --auth-file: present a token
                              # with `auth` before anything but hello
}

struct AddReply {
  ids @0 :List(Data);   # in the order of the request's messages
}

struct PolledMessage {
  id @0 :Data;
  payload @1 :Data;
  deliveryCount @2 :UInt32;   # 1 on first delivery
  enqueuedAtMs @3 :UInt64;
}

struct PollReply {
  lease @0 :Data;             # empty when nothing was available
  expiresAtMs @1 :UInt64;
  messages @2 :List(PolledMessage);
}

struct AuthReply {
  tenant @0 :Text;      # the tenant this connection is now bound to
}

struct PeekReply {
  messages @0 :List(PolledMessage);  # visible now, in delivery order; not leased
  cursor @1 :Data;                   # empty when there is nothing after them
  dead @2 :List(DeadLetter);  # a peek with dead = true: the dead letters
}

struct RemoveReply {
  removed @0 :List(Bool);     # one per requested id
}

struct ExtendReply {
  extended @0 :Bool;
  expiresAtMs @1 :UInt64;
}

struct ReleaseReply {
  released @0 :Bool;
}

struct PurgeReply {
  purged @0 :UInt64;          # messages dropped (visible, delayed and in flight)
}

struct QueueStats {
  visible @0 :UInt64;
  delayed @1 :UInt64;
  inFlight @2 :UInt64;
  oldestVisibleAgeMs @3 :UInt64;
  hasVisible @4 :Bool;        # whether oldestVisibleAgeMs means anything
  diskFull @5 :Bool;          # adds are being refused for lack of disk space
  dead @6 :UInt64;            # dead letters (see peek with dead, redrive)
  dropped @7 :UInt64;         # messages retention dropped, over the queue's life
}

struct FailReply {
  failed @0 :Bool;      # false: the lease does not hold the message (nothing done)
}

struct RedriveReply {
  moved @0 :UInt64;     # dead letters moved back
  more @1 :Bool;        # a redrive stops at 1000 per request: ask again for the rest
}
