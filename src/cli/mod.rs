//! The command line's work: each subcommand's checks of its arguments, the
//! library calls, and what is printed (tables, progress, JSON). `main.rs`
//! holds the argument types and the dispatch.

pub(crate) mod bench;
pub(crate) mod daemon;
pub(crate) mod echo;
pub(crate) mod info;
pub(crate) mod run;
