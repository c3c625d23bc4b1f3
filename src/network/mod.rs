//! The worker side of the pod network: the VXLAN tunnel between the pod's
//! network namespace on this node and its pod VM.

pub mod vni;
