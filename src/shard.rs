//! Scale-out, kept at its old path: [`Shard`] and `shard.json` live in
//! [`crate::analyze::shard`], [`merge`] in [`crate::analyze::merge`].

pub use crate::analyze::merge::merge;
pub use crate::analyze::shard::{FILE, FORMAT, Shard, ShardInfo};
