//! The GPU interface when built without the `cuda` feature: every entry answers
//! [`GpuError::NotCompiled`].

use super::{problem::Problem, GpuDtype, GpuError, GpuRun};

/// A GPU handle; cannot be created in this build.
pub struct Gpu {
    _never: std::convert::Infallible,
}

impl Gpu {
    /// Always [`GpuError::NotCompiled`].
    pub fn new() -> Result<Gpu, GpuError> {
        Err(GpuError::NotCompiled)
    }

    /// The device's name.
    pub fn device_name(&self) -> String {
        match self._never {}
    }

    /// Runs a problem.
    pub fn run(&self, _p: &Problem, _dtype: GpuDtype, _iters: usize) -> Result<GpuRun, GpuError> {
        match self._never {}
    }
}
