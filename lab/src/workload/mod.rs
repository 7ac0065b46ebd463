//! Small servers and clients that run inside topology namespaces, for the
//! e2e tests and the demo. Each server answers every request line (TCP) or
//! datagram (UDP) with its own name, so the client learns which backend a
//! ClusterIP request reached.

mod clients;
mod probe_process;
mod servers;

pub use self::{clients::*, probe_process::*, servers::*};
