//! Integration tests: the real `reshard` binary on the committed fixtures, in temp dirs.

mod consistency;
mod contract;
mod convert;
mod crash;
mod discovery;
mod dtypes;
mod errors;
mod families;
mod frontdoor;
mod gpu_cli;
mod hostile;
mod plan;
mod races;
mod reshard;
mod signals;
mod source;
mod special;
mod targets;
mod util;
mod verify;
