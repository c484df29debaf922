//! [`OwnedCompressor`]: a [`Compressor`] that owns its residual, velocity and scratch
//! (feature `alloc`). This is what the Python and C-with-heap faces use.

use alloc::vec;
use alloc::vec::Vec;

use crate::compress::{Buffers, Compressor, Config, Spare, StepInfo};
use crate::pages::zeroed;
use crate::select::Selection;
use crate::Error;

/// Tensors of at least this many elements (32 MiB of float32) are double-buffered by default
/// ([`OwnedCompressor::set_double_buffering`]). Smaller ones are faster in place: the
/// finiteness check's read leaves the gradient in the last-level cache (tens of MiB) for the
/// accumulation, while a spare adds a tensor to the working set. Measured on a 32 MiB-L3
/// AMD EPYC (docs/performance.md): in place wins below 2^22 elements, the two are even
/// at 2^23 and the spare wins from 2^24.
pub const DOUBLE_BUFFER_MIN: usize = 1 << 23;

/// A compressor that owns its state; allocation happens in [`OwnedCompressor::new`] (and
/// in [`OwnedCompressor::set_double_buffering`]), never while compressing.
#[derive(Clone, Debug)]
pub struct OwnedCompressor {
    core: Compressor,
    residual: Vec<f32>,
    velocity: Vec<f32>,
    scratch: Vec<u32>,
    /// The spare residual and velocity of double buffering (see [`Spare`]), swapped with
    /// `residual` and `velocity` after each message.
    spare: Option<(Vec<f32>, Vec<f32>)>,
}

impl OwnedCompressor {
    /// A compressor with zero residual and velocity; double-buffered from
    /// [`DOUBLE_BUFFER_MIN`] elements.
    pub fn new(config: Config, numel: usize) -> Result<Self, Error> {
        let core = Compressor::new(config, numel)?;
        let mut c = OwnedCompressor {
            residual: zeroed(numel),
            velocity: zeroed(core.velocity_len()),
            scratch: zeroed(core.scratch_len()),
            spare: None,
            core,
        };
        c.set_double_buffering(numel >= DOUBLE_BUFFER_MIN);
        Ok(c)
    }

    /// Double buffering: a second residual and velocity ([`Spare`]) receive each new state,
    /// so the gradient is read once instead of twice (the finiteness check comes free with
    /// the accumulation) and every error leaves the state unchanged; the cost is twice the
    /// state's memory. Off, the state is updated in place (what microcontrollers do).
    pub fn set_double_buffering(&mut self, on: bool) {
        self.spare = on.then(|| (zeroed(self.residual.len()), zeroed(self.velocity.len())));
    }

    /// Whether the compressor is double-buffered.
    pub fn double_buffering(&self) -> bool {
        self.spare.is_some()
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
        let (core, bufs) = self.lend();
        let info = core.compress(bufs, grad, out)?;
        if info.swapped {
            self.swap();
        }
        Ok(info)
    }

    /// The counters and the owned tensors, lent to them for one call.
    fn lend(&mut self) -> (&mut Compressor, Buffers<'_>) {
        let bufs = Buffers {
            residual: &mut self.residual,
            velocity: &mut self.velocity,
            scratch: &mut self.scratch,
            spare: self.spare.as_mut().map(|(r, u)| Spare {
                residual: r,
                velocity: u,
            }),
        };
        (&mut self.core, bufs)
    }

    /// The spare holds the new state: make it the state.
    fn swap(&mut self) {
        if let Some((r, u)) = self.spare.as_mut() {
            core::mem::swap(&mut self.residual, r);
            core::mem::swap(&mut self.velocity, u);
        }
    }

    /// Adds `grad` into the residual without sending; see [`Compressor::accumulate`].
    pub fn accumulate(&mut self, grad: &[f32]) -> Result<(), Error> {
        let (core, bufs) = self.lend();
        if core.accumulate(bufs, grad)? {
            self.swap();
        }
        Ok(())
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
