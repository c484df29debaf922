//! [`OwnedCompressor`]: a [`Compressor`] that owns its residual, velocity and scratch
//! (feature `alloc`). This is what the Python and C-with-heap faces use.

use alloc::vec;
use alloc::vec::Vec;

use crate::compress::{Buffers, Compressor, Config, Spare, StepInfo};
use crate::pages::zeroed;
use crate::select::{Selection, ThresholdController};
use crate::Error;

/// Tensors of at least this many elements (32 MiB of float32) are double-buffered by default
/// ([`OwnedCompressor::set_double_buffering`]). Smaller ones are faster in place: the
/// finiteness check's read leaves the gradient in the last-level cache (tens of MiB) for the
/// accumulation, while a spare adds a tensor to the working set. Measured on a 32 MiB-L3
/// AMD EPYC (docs/performance.md): in place wins below 2^22 elements, the two are even
/// at 2^23 and the spare wins from 2^24.
pub const DOUBLE_BUFFER_MIN: usize = 1 << 23;

/// A compressor that owns its state; allocation happens in [`OwnedCompressor::new`] (and
/// in [`OwnedCompressor::set_double_buffering`]); while compressing only the undo record
/// grows, when a message has more entries than any before (it is then reused).
#[derive(Clone, Debug)]
pub struct OwnedCompressor {
    core: Compressor,
    residual: Vec<f32>,
    velocity: Vec<f32>,
    scratch: Vec<u32>,
    /// The spare residual and velocity of double buffering (see [`Spare`]), swapped with
    /// `residual` and `velocity` after each message.
    spare: Option<(Vec<f32>, Vec<f32>)>,
    /// What [`OwnedCompressor::restore`] writes back: the last message's entries.
    undo: Undo,
    /// The record being written by a compress (becomes `undo` when it succeeds); after a
    /// success, the previous message's record (what [`OwnedCompressor::revert`] puts back).
    pending: Undo,
    /// How to take back the last call whole ([`OwnedCompressor::revert`]).
    revert: Revert,
    /// Whether compress keeps the undo record [`OwnedCompressor::restore`] needs (on by
    /// default). A face that only ever reverts turns it off: a dense message's record is
    /// every entry, a pass and twice the state's size in writes.
    recording: bool,
}

/// The counters before the last compress or accumulate that left the old state in the
/// spare; with the spare, they are the whole state before that call.
#[derive(Clone, Copy, Debug, Default)]
struct Revert {
    valid: bool,
    step: u64,
    controller: ThresholdController,
    state_bound: f32,
}

/// The undo record of one message: the sent entries' values before they were taken out
/// of the residual and their velocities before factor masking, with the counters before
/// the call. O(nnz) words.
#[derive(Clone, Debug, Default)]
struct Undo {
    /// Holds a message that can be restored.
    valid: bool,
    step: u64,
    controller: ThresholdController,
    indices: Vec<u32>,
    residual: Vec<f32>,
    velocity: Vec<f32>,
}

impl Undo {
    fn clear(&mut self) {
        self.valid = false;
        self.indices.clear();
        self.residual.clear();
        self.velocity.clear();
    }
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
            undo: Undo::default(),
            pending: Undo::default(),
            revert: Revert::default(),
            recording: true,
            core,
        };
        c.set_double_buffering(numel >= DOUBLE_BUFFER_MIN);
        Ok(c)
    }

    /// Turns the undo record of [`OwnedCompressor::restore`] on (the default) or off. Off,
    /// a compress records nothing, and `restore()` fails with [`Error::NothingToRestore`]
    /// until a compress with recording on; [`OwnedCompressor::revert`] is unaffected.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
        if !on {
            self.undo.clear();
        }
    }

    /// Whether compress keeps the undo record of [`OwnedCompressor::restore`].
    pub fn recording(&self) -> bool {
        self.recording
    }

    /// Double buffering: a second residual and velocity ([`Spare`]) receive each new state,
    /// so the gradient is read once instead of twice (the finiteness check comes free with
    /// the accumulation) and every error leaves the state unchanged; the cost is twice the
    /// state's memory. Off, the state is updated in place (what microcontrollers do).
    pub fn set_double_buffering(&mut self, on: bool) {
        self.revert.valid = false;
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

    /// Mutable counters (for restoring a checkpoint). Drops the undo record.
    pub fn core_mut(&mut self) -> &mut Compressor {
        self.undo.clear();
        self.revert.valid = false;
        &mut self.core
    }

    /// The error-feedback residual.
    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Mutable residual (for restoring a checkpoint). Drops the undo record and marks the
    /// state's bound unknown ([`Compressor::state_bound`]).
    pub fn residual_mut(&mut self) -> &mut [f32] {
        self.forget();
        &mut self.residual
    }

    /// The momentum velocity (empty without momentum).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Mutable velocity (for restoring a checkpoint); as [`OwnedCompressor::residual_mut`].
    pub fn velocity_mut(&mut self) -> &mut [f32] {
        self.forget();
        &mut self.velocity
    }

    /// The state is about to be written from outside: no undo, bound unknown.
    fn forget(&mut self) {
        self.undo.clear();
        self.revert.valid = false;
        self.core.state_bound = f32::INFINITY;
    }

    /// Changes the selection rule, keeping the state; grows the scratch if needed. On error
    /// nothing changed; on success the undo record is dropped (it restores the counters of
    /// the old rule).
    pub fn set_selection(&mut self, selection: Selection) -> Result<(), Error> {
        self.core.set_selection(selection)?;
        self.undo.clear();
        self.revert.valid = false;
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

    /// Compresses `grad` into `out`; see [`Compressor::compress`] (every error leaves the
    /// state, and the undo record of the previous message, as they were). Keeps an undo
    /// record of this message for [`OwnedCompressor::restore`].
    pub fn compress(&mut self, grad: &[f32], out: &mut [u8]) -> Result<StepInfo, Error> {
        let before = self.before_call();
        let mut pending = core::mem::take(&mut self.pending);
        pending.clear();
        (pending.step, pending.controller) = (self.core.step, self.core.controller);
        let momentum = self.core.config().momentum.has_velocity();
        let mut record = |i: usize, v: f32, u: f32| {
            pending.indices.push(i as u32);
            pending.residual.push(v);
            if momentum {
                pending.velocity.push(u);
            }
        };
        let recording = self.recording;
        let (core, bufs) = self.lend();
        let result =
            core.compress_recording(bufs, grad, out, recording.then_some(&mut record as _));
        if let Ok(info) = result {
            if info.swapped {
                self.swap();
                self.revert = before;
            }
            pending.valid = recording;
            core::mem::swap(&mut self.undo, &mut pending);
        }
        self.pending = pending;
        result
    }

    /// Puts the entries of the last message back, bit-exactly: the residual and velocity
    /// (factor masking undone), the step and the adaptive controller are exactly as after
    /// accumulating that gradient without sending (as [`OwnedCompressor::accumulate`]
    /// would have left them). A message the transport could not deliver is not lost:
    /// compress `g1`, restore, compress `g2` gives the bytes and state of accumulate `g1`,
    /// compress `g2`. O(nnz). Available once per message, until the next compress,
    /// accumulate, restore, set_selection or state write; otherwise
    /// [`Error::NothingToRestore`] and nothing changes.
    pub fn restore(&mut self) -> Result<(), Error> {
        if !self.undo.valid {
            return Err(Error::NothingToRestore);
        }
        self.revert.valid = false;
        let u = &mut self.undo;
        for (j, &i) in u.indices.iter().enumerate() {
            let i = i as usize;
            if let (Some(r), Some(&v)) = (self.residual.get_mut(i), u.residual.get(j)) {
                *r = v;
            }
            if let (Some(x), Some(&v)) = (self.velocity.get_mut(i), u.velocity.get(j)) {
                *x = v;
            }
        }
        // The bound stays valid: the values put back were within it.
        (self.core.step, self.core.controller) = (u.step, u.controller);
        u.clear();
        Ok(())
    }

    /// Adds any earlier message back into the residual; see [`Compressor::restore_message`]
    /// (exact up to one f32 rounding per entry, velocity masking not undone). All or
    /// nothing; drops the undo record.
    pub fn restore_message(&mut self, msg: &[u8]) -> Result<(), Error> {
        self.core.restore_message(&mut self.residual, msg)?;
        self.undo.clear();
        self.revert.valid = false;
        Ok(())
    }

    /// Takes back the last compress or accumulate whole: the residual, velocity, step,
    /// adaptive controller, state bound and undo record are exactly as before that call
    /// (unlike [`OwnedCompressor::restore`], which leaves the gradient accumulated). O(1):
    /// the old state is still in the spare, so this needs double buffering and works once,
    /// until the next call that changes the state (a failed one included, which may have
    /// written the spare); otherwise [`Error::NothingToRestore`] and nothing changes.
    pub fn revert(&mut self) -> Result<(), Error> {
        let r = self.revert;
        if !r.valid {
            return Err(Error::NothingToRestore);
        }
        self.swap();
        (self.core.step, self.core.controller, self.core.state_bound) =
            (r.step, r.controller, r.state_bound);
        // The record the call replaced (a compress) or dropped (an accumulate) is in `pending`.
        core::mem::swap(&mut self.undo, &mut self.pending);
        self.revert.valid = false;
        Ok(())
    }

    /// Whether [`OwnedCompressor::revert`] can take back the last call.
    pub fn can_revert(&self) -> bool {
        self.revert.valid
    }

    /// The revert record of the call about to run (valid once it succeeds into the
    /// spare); any earlier one is dropped, as the call may write the spare.
    fn before_call(&mut self) -> Revert {
        self.revert.valid = false;
        Revert {
            valid: true,
            step: self.core.step,
            controller: self.core.controller,
            state_bound: self.core.state_bound,
        }
    }

    /// Whether [`OwnedCompressor::restore`] has a message to put back.
    pub fn can_restore(&self) -> bool {
        self.undo.valid
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
        let before = self.before_call();
        let (core, bufs) = self.lend();
        if core.accumulate(bufs, grad)? {
            self.swap();
            // Keep the dropped record in `pending` for a revert.
            core::mem::swap(&mut self.undo, &mut self.pending);
            self.revert = before;
        }
        self.undo.clear();
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
