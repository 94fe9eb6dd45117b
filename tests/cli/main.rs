//! Integration tests: the real `reshard` binary on the committed fixtures, in temp dirs.

mod contract;
mod convert;
mod crash;
mod dtypes;
mod errors;
mod families;
mod gpu_cli;
mod hostile;
mod plan;
mod source;
mod targets;
mod util;
mod verify;
