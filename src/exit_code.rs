//! The process exit codes: a public, documented table that scripts rely on.
//!
//! Every error the library returns maps to exactly one of these through [`crate::Error::exit_code`].
//! The table is repeated in README.md and asserted by the integration tests.

/// Everything asked for was done (and, for `verify`/`validate`, every check held).
pub const OK: u8 = 0;
/// `verify` or `validate` ran to the end and found at least one mismatch.
pub const CHECK_FAILED: u8 = 1;
/// Bad input: command-line usage, a checkpoint, config.json, a mapping file, or a tensor-parallel
/// size that the model does not allow. Nothing was written.
pub const BAD_INPUT: u8 = 2;
/// A GPU was required (`validate`) but is not available: the binary was built without the `cuda`
/// feature, or no CUDA driver, cuBLAS, NVRTC or device could be found.
pub const GPU_UNAVAILABLE: u8 = 3;
/// The output could not be written: `--out` exists, is not writable, the disk filled up, or another
/// I/O error happened while writing. No finished-looking output is left behind.
pub const OUTPUT_FAILED: u8 = 4;
/// `convert` was interrupted by SIGHUP, SIGINT or SIGTERM: the exit code is this plus the signal
/// number (129, 130, 143). What the run wrote was removed, and its message says what is at `--out`.
pub const SIGNALLED: i32 = 128;
