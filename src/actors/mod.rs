//! The actors: the supervisor, one pod VM actor per sandbox, and one
//! provider actor. Each is a shell over plain logic.

pub mod pod_vm;
pub mod provider;
pub mod supervisor;
