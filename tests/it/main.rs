//! Integration tests: real `de-controller` and `de-agent` processes talking
//! over real QUIC on loopback addresses (127.0.0.x).

mod artifacts;
mod codes;
mod config;
mod console;
mod converge;
mod dectl;
mod demo;
mod deploy;
mod duplicates;
mod enrolment;
mod faults;
mod https;
mod link_security;
mod metrics;
mod monit;
mod monit_states;
mod node_identity;
mod offline;
mod operate;
mod pki_rotation;
mod plans;
mod planted;
mod races;
mod rollout;
mod silent;
mod sim;
mod skew;
mod step_refusals;
mod steps;
mod tokens;
