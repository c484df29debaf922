//! [`OwnedCompressor`]: a [`Compressor`] that owns its residual, velocity and scratch
//! (feature `alloc`). This is what the Python and C-with-heap faces use.

use alloc::vec;
use alloc::vec::Vec;

use crate::compress::{Buffers, Compressor, Config, StepInfo};
use crate::select::Selection;
use crate::Error;

/// A compressor that owns its state; allocation happens once, in [`OwnedCompressor::new`].
#[derive(Clone, Debug)]
pub struct OwnedCompressor {
    core: Compressor,
    residual: Vec<f32>,
    velocity: Vec<f32>,
    scratch: Vec<u32>,
}

impl OwnedCompressor {
    /// A compressor with zero residual and velocity.
    pub fn new(config: Config, numel: usize) -> Result<Self, Error> {
        let core = Compressor::new(config, numel)?;
        Ok(OwnedCompressor {
            residual: vec![0.0; numel],
            velocity: vec![0.0; core.velocity_len()],
            scratch: vec![0; core.scratch_len()],
            core,
        })
    }

    /// The counters and configuration.
    pub fn core(&self) -> &Compressor {
        &self.core
    }

    /// Mutable counters (for restoring a checkpoint).
    pub fn core_mut(&mut self) -> &mut Compressor {
        &mut self.core
    }

    /// The error-feedback residual.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Mutable residual (for restoring a checkpoint).
    pub fn residual_mut(&mut self) -> &mut [f32] {
        &mut self.residual
    }

    /// The momentum velocity (empty without momentum).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Mutable velocity (for restoring a checkpoint).
    pub fn velocity_mut(&mut self) -> &mut [f32] {
        &mut self.velocity
    }

    /// Changes the selection rule, keeping the state; grows the scratch if needed.
    pub fn set_selection(&mut self, selection: Selection) -> Result<(), Error> {
        self.core.set_selection(selection)?;
        let need = self.core.scratch_len();
        if self.scratch.len() < need {
            self.scratch.resize(need, 0);
        }
        Ok(())
    }

    /// Splits whole-tensor passes over threads: see [`Compressor::set_threads`].
    pub fn set_threads(&mut self, threads: usize) {
        self.core.set_threads(threads);
    }

    /// The largest message; `out` must be at least this long.
    pub fn max_message_len(&self) -> usize {
        self.core.max_message_len()
    }

    /// Compresses `grad` into `out`; see [`Compressor::compress`].
    pub fn compress(&mut self, grad: &[f32], out: &mut [u8]) -> Result<StepInfo, Error> {
        let bufs = Buffers {
            residual: &mut self.residual,
            velocity: &mut self.velocity,
            scratch: &mut self.scratch,
        };
        self.core.compress(bufs, grad, out)
    }

    /// Adds `grad` into the residual without sending; see [`Compressor::accumulate`].
    pub fn accumulate(&mut self, grad: &[f32]) -> Result<(), Error> {
        let bufs = Buffers {
            residual: &mut self.residual,
            velocity: &mut self.velocity,
            scratch: &mut self.scratch,
        };
        self.core.accumulate(bufs, grad)
    }

    /// Compresses `grad` into a new vector of exactly the message's length.
    pub fn compress_to_vec(&mut self, grad: &[f32]) -> Result<Vec<u8>, Error> {
        let mut out = vec![0u8; self.max_message_len()];
        let info = self.compress(grad, &mut out)?;
        out.truncate(info.bytes);
        Ok(out)
    }
}

/// Decodes a message into a new dense vector. `max_numel` bounds the allocation: a header
/// announcing more elements is rejected with [`Error::TooLarge`] before anything is allocated.
pub fn decode_to_vec(msg: &[u8], max_numel: usize) -> Result<Vec<f32>, Error> {
    let m = crate::wire::parse(msg, max_numel)?;
    let mut out = vec![0.0f32; m.header.numel as usize];
    crate::wire::decode_add(msg, &mut out, 1.0)?;
    Ok(out)
}
