//! The hash maps of the server's hot paths: std's maps with foldhash's
//! seeded hasher instead of SipHash.
//!
//! Why: the store and the shard core hash queue names, ids and connection
//! numbers several times per message (a remove checks its holder and
//! lease, a poll records both; the core keys its waiters, a batch's
//! deliveries and its reply rooms). SipHash was 8% of the server's
//! instructions per message in the store and 1.5-2% more in the core
//! (callgrind). Each map gets its own random seed, so names clients choose
//! cannot be aimed at one bucket.

use std::collections::{HashMap, HashSet};

pub(crate) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub(crate) type Set<K> = HashSet<K, foldhash::fast::RandomState>;
