//! Integration tests: the real `reshard` binary on the committed fixtures, in temp dirs.

mod contract;
mod convert;
mod crash;
mod errors;
mod families;
mod gpu_cli;
mod hostile;
mod plan;
mod races;
mod signals;
mod targets;
mod util;
mod verify;
