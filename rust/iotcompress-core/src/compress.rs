//! The pipeline: error feedback + momentum → selection → quantisation → wire format.
//!
//! [`Compressor`] is a few words of configuration and counters; the tensors it works on
//! (residual, velocity, scratch) are lent by the caller in [`Buffers`], so the whole path
//! runs without a heap. [`crate::OwnedCompressor`] (feature `alloc`) owns them instead.

use crate::feedback::{accumulate_one, Momentum};
use crate::float::{ceil_usize, mag_bits};
use crate::kernels::{prefetch, Accumulated, Passes, Update};
use crate::quant::{Quant, Quantizer, ValueStats};
use crate::rng::{self, Purpose};
use crate::select::{
    entries_within, k_for_density, kth_largest, threshold_list_cap, SamplePlan, Selection, Target,
    ThresholdController,
};
use crate::wire::crc::crc32c;
use crate::wire::{
    max_encoded_len, BitWriter, Header, IndexCoding, IndexCost, IndexWriter, CHECKSUM_LEN,
};
use crate::Error;

/// Everything that shapes a message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Which entries are sent.
    pub selection: Selection,
    /// How their values are coded.
    pub quant: Quant,
    /// Momentum correction before selection.
    pub momentum: Momentum,
    /// Seed of the sampling and stochastic-rounding streams.
    pub seed: u64,
}

impl Config {
    /// Plain error feedback with f32 values.
    pub const fn new(selection: Selection) -> Self {
        Config {
            selection,
            quant: Quant::F32,
            momentum: Momentum::None,
            seed: 0,
        }
    }

    /// Checks every option's range.
    pub fn validate(&self) -> Result<(), Error> {
        let density_ok = |d: f64| d > 0.0 && d <= 1.0;
        let ok = match self.selection {
            Selection::Dense => true,
            Selection::Threshold(t) => t >= 0.0 && t.is_finite(),
            Selection::TopK { density, .. } => density_ok(density),
            Selection::Adaptive(Target::Density(d)) => density_ok(d),
            Selection::Adaptive(Target::Bytes(b)) => b > 0,
        };
        let m = self.momentum.factor();
        let momentum_ok = (0.0..1.0).contains(&m);
        let quant_ok = !matches!(self.quant, Quant::Qsgd { levels: 0 });
        if ok && momentum_ok && quant_ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig)
        }
    }
}

/// The caller-owned tensors of one compressor.
#[derive(Debug)]
pub struct Buffers<'a> {
    /// Error-feedback residual, `numel` elements (zeros at the start).
    pub residual: &'a mut [f32],
    /// Momentum velocity, `numel` elements when momentum is on, may be empty otherwise.
    pub velocity: &'a mut [f32],
    /// Working space of at least [`Compressor::scratch_len`] words; contents do not matter.
    pub scratch: &'a mut [u32],
    /// Double buffering (optional): where the new state is written, so that the old one
    /// stays intact until every new value is known to be finite. Saves the gradient's
    /// finiteness pre-check, a whole read of it (see [`Spare`]); `None` updates the state
    /// in place, with the pre-check.
    pub spare: Option<Spare<'a>>,
}

/// The second residual and velocity of double buffering ([`Buffers::spare`]). A call that
/// succeeds leaves the new state here and says so ([`StepInfo::swapped`]): the caller swaps
/// these buffers with [`Buffers::residual`] and [`Buffers::velocity`] before the next call.
/// Contents on entry do not matter; after an error they are garbage and the state (in
/// `residual` and `velocity`) is unchanged.
#[derive(Debug)]
pub struct Spare<'a> {
    /// `numel` elements.
    pub residual: &'a mut [f32],
    /// As [`Buffers::velocity`]: `numel` elements when momentum is on.
    pub velocity: &'a mut [f32],
}

/// What the last call to [`Compressor::compress`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepInfo {
    /// Bytes of the message.
    pub bytes: usize,
    /// Entries sent.
    pub nnz: usize,
    /// The new state is in [`Buffers::spare`] (always, when one was given): swap it with the
    /// residual and velocity.
    pub swapped: bool,
}

/// From this many elements (16 MiB per tensor) the accumulation into a spare bypasses the
/// caches: the tensors no longer fit in them, and the new state costs no read for ownership.
/// Below, plain stores leave it in the caches for the rest of the call and the next one.
const STREAM_MIN: usize = 1 << 22;

/// The residual and velocity of one call: the old state until the accumulation, then the
/// new one, in place or in the spare.
struct State<'a> {
    r: &'a mut [f32],
    u: &'a mut [f32],
    spare: Option<Spare<'a>>,
    /// The accumulation succeeded into `spare`: it holds the state now.
    moved: bool,
    /// The largest magnitude among the accumulated `v` and new `u` (bits; 0 before).
    max_mag: u32,
}

/// The headroom rule of the in-place path: a step whose state bound `b` and gradient
/// magnitude `g` satisfy `2 (b + g) <= 2^127` cannot overflow, whatever the momentum rule
/// (`|u'| <= b + g`, `|v| <= |r| + |u'| + |g| <= 2b + 2g`, and three roundings stay far
/// below `f32::MAX`, about `2^128`).
fn within_headroom(bound: f32, g: f32) -> bool {
    2.0 * (bound as f64 + g as f64) <= HEADROOM
}

/// See [`within_headroom`]: 2^127.
const HEADROOM: f64 = 1.7014118346046923e38;

impl State<'_> {
    /// The residual and velocity now: before the accumulation the old state, after it `v`
    /// and the new velocity.
    fn now(&self) -> (&[f32], &[f32]) {
        match &self.spare {
            Some(s) if self.moved => (s.residual, s.velocity),
            _ => (self.r, self.u),
        }
    }

    /// As [`State::now`], writable.
    fn now_mut(&mut self) -> (&mut [f32], &mut [f32]) {
        match &mut self.spare {
            Some(s) if self.moved => (s.residual, s.velocity),
            _ => (self.r, self.u),
        }
    }

    /// In place, a NaN or an overflow would be in the state before the accumulation could
    /// see it: look first, in one read of the gradient. Its largest magnitude comes with the
    /// finiteness check, and with `bound` (the compressor's [`Compressor::state_bound`]) the
    /// headroom rule proves almost every step safe. Only a state near the limit (or of
    /// unknown size) takes the rare slow path: measure the state, and if that is not enough
    /// either, try the step without storing it. Into a spare, the accumulation's own check
    /// suffices (the old state stays intact until it passed).
    fn check_headroom(
        &self,
        passes: Passes,
        rule: Momentum,
        g: &[f32],
        bound: f32,
    ) -> Result<(), Error> {
        if self.spare.is_some() {
            return Ok(());
        }
        let g_max = passes.max_mag(g);
        if g_max >= INFINITY_BITS {
            return Err(Error::NonFiniteGradient);
        }
        let g_max = f32::from_bits(g_max);
        if within_headroom(bound, g_max) {
            return Ok(());
        }
        let measured = f32::from_bits(passes.max_mag(self.r).max(passes.max_mag(self.u)));
        if within_headroom(measured, g_max) {
            return Ok(());
        }
        let u = |i: usize| self.u.get(i).copied().unwrap_or(0.0);
        let finite = self.r.iter().zip(g).enumerate().all(|(i, (&r, &g))| {
            let (v, u) = accumulate_one(rule, r, u(i), g);
            v.is_finite() && u.is_finite()
        });
        if finite {
            Ok(())
        } else {
            Err(Error::Overflow)
        }
    }

    /// The accumulation pass (see [`Passes::accumulate`]): from the old state into the spare
    /// if there is one (the old state stays as it was on error), else in place.
    fn accumulate(
        &mut self,
        passes: Passes,
        rule: Momentum,
        g: &[f32],
        gather_at: Option<u32>,
        list: &mut [u32],
    ) -> Result<usize, Error> {
        let upd = match &mut self.spare {
            Some(s) => Update::Into {
                r: self.r,
                u: self.u,
                r_new: s.residual,
                u_new: s.velocity,
                stream: g.len() >= STREAM_MIN,
            },
            None => Update::InPlace {
                r: self.r,
                u: self.u,
            },
        };
        let Accumulated { count, max_mag } = passes.accumulate(rule, upd, g, gather_at, list)?;
        self.moved = self.spare.is_some();
        self.max_mag = max_mag;
        Ok(count)
    }
}

/// A compressor for one tensor of `numel` float32 elements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compressor {
    config: Config,
    numel: usize,
    /// Messages produced so far: part of the state, it seeds each message's streams.
    pub step: u64,
    /// Adaptive threshold state (unused by the other selections).
    pub controller: ThresholdController,
    /// Threads for the passes over the whole tensor (feature `std`; 1 otherwise).
    threads: usize,
    /// An upper bound on every `|residual|` and `|velocity|` entry, kept from the last pass
    /// (0 for the zero state; `f32::INFINITY`: unknown). The in-place path proves with it
    /// that a step cannot overflow (see [`Compressor::compress`]). Whoever writes the
    /// residual or velocity buffers other than through this compressor (a checkpoint
    /// loaded into them) sets it to `f32::INFINITY`, or to the checkpoint's bound.
    pub state_bound: f32,
}

/// Bits of `f32::INFINITY`: magnitude bits at or above it are not finite.
const INFINITY_BITS: u32 = 0x7f80_0000;

/// Which entries the selection picked; the emission loops iterate it twice (statistics,
/// then encoding), so it must be a pure function of `v` and the scratch list.
#[derive(Clone, Copy, Debug)]
enum Picked {
    All,
    /// Indices in `scratch[start..start + len]`, increasing; with `mags: Some(m)`, their
    /// magnitude bits in `scratch[m..m + len]` (a pass over them reads no residual).
    List {
        start: usize,
        len: usize,
        mags: Option<usize>,
    },
    /// `|v| > above`, or `|v| == above` for the first `ties` such, at most `limit` in all.
    Scan {
        above: u32,
        ties: usize,
        limit: usize,
    },
}

impl Compressor {
    /// A compressor with zero state. Fails on out-of-range options or `numel > u32::MAX`.
    pub fn new(config: Config, numel: usize) -> Result<Self, Error> {
        config.validate()?;
        if numel as u64 > u32::MAX as u64 {
            return Err(Error::InvalidConfig);
        }
        Ok(Compressor {
            config,
            numel,
            step: 0,
            controller: ThresholdController::new(),
            threads: 1,
            state_bound: 0.0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Changes the selection rule, keeping the state (a warm-up schedule, a link that got
    /// slower). The scratch requirement may grow: check [`Compressor::scratch_len`].
    pub fn set_selection(&mut self, selection: Selection) -> Result<(), Error> {
        let config = Config {
            selection,
            ..self.config
        };
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Splits the passes over the whole tensor (accumulation, candidate gathering, the
    /// finiteness check) over `threads` threads when the tensor is large (feature `std`;
    /// ignored otherwise). Messages and state are identical for every thread count.
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// The thread count set by [`Compressor::set_threads`].
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Elements per tensor.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Velocity elements needed (0 without momentum).
    pub fn velocity_len(&self) -> usize {
        if self.config.momentum.has_velocity() {
            self.numel
        } else {
            0
        }
    }

    /// Scratch words needed.
    pub fn scratch_len(&self) -> usize {
        let n = self.numel;
        match self.config.selection {
            Selection::Dense => 0,
            Selection::Threshold(_) => threshold_list_cap(n),
            Selection::TopK { exact: true, .. } => n,
            Selection::TopK {
                density,
                exact: false,
            } => SamplePlan::new(n, k_for_density(density, n)).scratch_len(n),
            // Calibration steps run a sampled top-k whose k depends on the measured message
            // sizes; a sampled plan never needs more than `n` words.
            Selection::Adaptive(_) => n,
        }
    }

    /// The largest message this compressor can produce: size `out` with this.
    pub fn max_message_len(&self) -> usize {
        max_encoded_len(self.numel, self.config.quant)
    }

    /// Compresses one gradient into `out` and updates the state; returns the message length.
    ///
    /// All or nothing: every error ([`Error::NonFiniteGradient`]: the gradient holds NaN or
    /// infinity; [`Error::Overflow`]: a finite gradient whose sum with the state would
    /// overflow f32; length and buffer errors) leaves the state (residual, velocity, step,
    /// controller, [`Compressor::state_bound`]) exactly as it was. With a [`Buffers::spare`]
    /// the new state of a success is in the spare ([`StepInfo::swapped`]).
    ///
    /// In place, overflow is ruled out before anything is written, without a second pass:
    /// the finiteness check of the gradient also yields its largest magnitude `G`, and
    /// [`Compressor::state_bound`] `B` bounds the state (kept from the previous pass at no
    /// cost: twice the largest accumulated magnitude, as a sent entry's error is at most
    /// twice its value for every quantiser). `2 (B + G) <= 2^127` proves the step safe; only
    /// a state within a factor of about four of overflowing measures itself (one more pass)
    /// and, if still in doubt, tries the step without storing it.
    pub fn compress(
        &mut self,
        bufs: Buffers<'_>,
        grad: &[f32],
        out: &mut [u8],
    ) -> Result<StepInfo, Error> {
        self.compress_recording(bufs, grad, out, None)
    }

    /// [`Compressor::compress`], calling `record(index, v, u)` for every entry the message
    /// sends with its value before it was taken out of the residual and its velocity before
    /// factor masking: an undo record of `nnz` entries (in increasing index order). Writing
    /// them back into the residual and velocity (and the step and controller as they were
    /// before the call) undoes the message bit-exactly; [`crate::OwnedCompressor::restore`]
    /// does it. `record` is called after every check that can fail: once called, the call
    /// succeeds.
    pub fn compress_recording(
        &mut self,
        bufs: Buffers<'_>,
        grad: &[f32],
        out: &mut [u8],
        record: Option<&mut dyn FnMut(usize, f32, f32)>,
    ) -> Result<StepInfo, Error> {
        let n = self.numel;
        let (mut state, scratch) = self.state(bufs, grad)?;
        if out.len() < self.max_message_len() {
            return Err(Error::BufferTooSmall);
        }
        if scratch.len() < self.scratch_len() {
            return Err(Error::ScratchTooSmall);
        }
        let passes = Passes::new(self.threads);
        let cfg = self.config;
        state.check_headroom(passes, cfg.momentum, grad, self.state_bound)?;
        let (picked, target, crossed) = self.select(passes, &mut state, grad, scratch)?;
        let swapped = state.moved;
        // A sent entry keeps `v - q(v)`, `q(v)` of v's sign and at most about |v|: at most 2|v|.
        let bound = f32::from_bits(state.max_mag) * 2.0;
        let (residual, velocity) = state.now_mut();
        if let Some(record) = record {
            let u = |i: usize| velocity.get(i).copied().unwrap_or(0.0);
            for_each_picked(picked, scratch, residual, |i, v| record(i, *v, u(i)));
        }
        if let Picked::All = picked {
            if let Some(bytes) = self.emit_dense(passes, residual, velocity, out)? {
                self.step += 1;
                self.state_bound = bound;
                return Ok(StepInfo {
                    bytes,
                    nnz: n,
                    swapped,
                });
            }
        }

        // Pass 1 over the picked entries: value statistics and the exact index costs.
        let need_abs = cfg.quant.needs().1;
        let mut mags = MagStats::new();
        let mut cost = IndexCost::new();
        let split = picked_split(passes, picked, scratch);
        match (picked, split) {
            (
                Picked::List {
                    start,
                    len,
                    mags: Some(m),
                },
                _,
            ) => {
                // The selection left the magnitudes in list order: no residual reads.
                let at = |from: usize| scratch.get(from..from + len).unwrap_or(&[]);
                at(start).iter().for_each(|&i| cost.push(i as usize));
                at(m).iter().for_each(|&mag| mags.push(mag, need_abs));
            }
            // A sum of |v| over parts would round differently: it stays on one thread.
            (_, Some((list, part))) if !need_abs => {
                list.iter().for_each(|&i| cost.push(i as usize));
                mags = split_stats(passes, list, part, residual);
            }
            _ => for_each_picked(picked, scratch, residual, |i, v| {
                cost.push(i);
                mags.push(mag_bits(*v), need_abs);
            }),
        }
        let (nnz, min_mag) = (mags.count, mags.min);
        let stats = ValueStats {
            // Magnitude bits order as the magnitudes do (v is finite here).
            max_abs: f32::from_bits(mags.max),
            sum_abs: mags.sum_abs,
        };
        let (index, index_len) = cost.choose(n);
        let scale = cfg.quant.scale(&stats, nnz);
        let stream = if cfg.quant.is_stochastic() {
            rng::stream(cfg.seed, self.step, Purpose::Rounding)
        } else {
            0
        };
        let header = Header {
            numel: n as u32,
            nnz: nnz as u32,
            quant: cfg.quant,
            index,
            scale,
            stream,
        };
        let header_len = header.write(out)?;
        let values_len = cfg
            .quant
            .value_bytes(nnz as u64)
            .ok_or(Error::BufferTooSmall)? as usize;
        let total = header_len + index_len + values_len + CHECKSUM_LEN;
        let body = out
            .get_mut(header_len..total)
            .ok_or(Error::BufferTooSmall)?;
        let (index_region, values_region) = body.split_at_mut(index_len);
        let (values_region, _) = values_region.split_at_mut(values_len);

        // Pass 2: write index and value codes, leave the quantisation error in the residual.
        let q = Quantizer::new(cfg.quant, scale, stream);
        let mut indices = IndexWriter::new(index, index_region);
        let mask_velocity = cfg.momentum.has_velocity();
        let velocity = if mask_velocity { velocity } else { &mut [][..] };
        let written = if let Some((list, part)) = split {
            split_emit(
                passes,
                list,
                part,
                &q,
                indices,
                residual,
                velocity,
                values_region,
            )
        } else {
            let mut values = ValueWriter::new(cfg.quant, values_region);
            for_each_picked(picked, scratch, residual, |i, v| {
                indices.push(i);
                emit_value(&q, &mut values, i as u32, v);
                if let Some(u) = velocity.get_mut(i) {
                    *u = 0.0; // factor masking
                }
            });
            indices.finish() && values.finish()
        };
        if !written {
            return Err(Error::BufferTooSmall);
        }
        let crc = crc32c(&out[..total - CHECKSUM_LEN]);
        out[total - CHECKSUM_LEN..total].copy_from_slice(&crc.to_le_bytes());

        if let Selection::Adaptive(_) = cfg.selection {
            if self.controller.threshold <= 0.0 {
                // Calibration step: the smallest magnitude that made it into the top-k.
                self.controller.threshold = if nnz > 0 {
                    f32::from_bits(min_mag)
                } else {
                    0.0
                };
                self.controller.bits_per_entry = if nnz > 0 {
                    total as f32 * 8.0 / nnz as f32
                } else {
                    0.0
                };
            } else {
                // Entries held back by the budget still count: they must raise `Wt`.
                self.controller
                    .update(crossed.unwrap_or(nnz), target, total);
            }
        }
        self.step += 1;
        self.state_bound = bound;
        Ok(StepInfo {
            bytes: total,
            nnz,
            swapped,
        })
    }

    /// Adds one gradient into the residual (with the momentum rule, as [`Compressor::compress`]
    /// does) without selecting or sending anything: a round this device skips. Nothing is
    /// lost, the next [`Compressor::compress`] sends from the sum. The message counter
    /// [`Compressor::step`] does not move (no message was made). With a spare (see
    /// [`Buffers::spare`]) the new state is written there and `true` says so: swap them.
    ///
    /// Errors are those of [`Compressor::compress`], with the same guarantees for the state.
    pub fn accumulate(&mut self, bufs: Buffers<'_>, grad: &[f32]) -> Result<bool, Error> {
        let (mut state, _) = self.state(bufs, grad)?;
        let passes = Passes::new(self.threads);
        let rule = self.config.momentum;
        state.check_headroom(passes, rule, grad, self.state_bound)?;
        state.accumulate(passes, rule, grad, None, &mut [])?;
        self.state_bound = f32::from_bits(state.max_mag);
        Ok(state.moved)
    }

    /// Adds a message back into the residual (`residual += decode(msg)`): a message the
    /// transport could not deliver is not lost. Exact up to one f32 rounding per entry
    /// (`(v - q) + q` may differ from `v` in the last bit); the velocity's factor masking
    /// is not undone (the message does not hold it): the exact undo of the last message is
    /// [`crate::OwnedCompressor::restore`]. All or nothing: a message that does not decode
    /// (or is for another size) changes nothing. [`Compressor::state_bound`] becomes unknown.
    pub fn restore_message(&mut self, residual: &mut [f32], msg: &[u8]) -> Result<(), Error> {
        if residual.len() != self.numel {
            return Err(Error::LengthMismatch);
        }
        crate::wire::decode_add(msg, residual, 1.0)?;
        self.state_bound = f32::INFINITY;
        Ok(())
    }

    /// The lent buffers as this call's [`State`] (and the scratch), lengths checked.
    fn state<'a>(
        &self,
        bufs: Buffers<'a>,
        grad: &[f32],
    ) -> Result<(State<'a>, &'a mut [u32]), Error> {
        let n = self.numel;
        let Buffers {
            residual,
            velocity,
            scratch,
            spare,
        } = bufs;
        let vn = self.velocity_len();
        if grad.len() != n || residual.len() != n || velocity.len() < vn {
            return Err(Error::LengthMismatch);
        }
        if let Some(s) = &spare {
            if s.residual.len() != n || s.velocity.len() < vn {
                return Err(Error::LengthMismatch);
            }
        }
        let state = State {
            r: residual,
            u: &mut velocity[..vn],
            spare: spare.map(|s| Spare {
                residual: s.residual,
                velocity: &mut s.velocity[..vn],
            }),
            moved: false,
            max_mag: 0,
        };
        Ok((state, scratch))
    }

    /// Every entry, byte-aligned codes: one monomorphic pass writes the codes and leaves the
    /// quantisation error in the residual (the general path below makes two generic passes).
    /// The message length; `None` for the quantisers it does not cover.
    fn emit_dense(
        &self,
        passes: Passes,
        r: &mut [f32],
        u: &mut [f32],
        out: &mut [u8],
    ) -> Result<Option<usize>, Error> {
        let quant = self.config.quant;
        if !matches!(quant, Quant::F32 | Quant::F16 | Quant::Bf16 | Quant::Int8) {
            return Ok(None);
        }
        let n = r.len();
        let stats = ValueStats {
            max_abs: if quant.needs().0 {
                f32::from_bits(passes.max_mag(r))
            } else {
                0.0
            },
            sum_abs: 0.0,
        };
        let scale = quant.scale(&stats, n);
        let header = Header {
            numel: n as u32,
            nnz: n as u32,
            quant,
            index: IndexCoding::Dense,
            scale,
            stream: 0,
        };
        let header_len = header.write(out)?;
        let values_len = quant.value_bytes(n as u64).ok_or(Error::BufferTooSmall)? as usize;
        let total = header_len + values_len + CHECKSUM_LEN;
        let values = out
            .get_mut(header_len..header_len + values_len)
            .ok_or(Error::BufferTooSmall)?;
        passes.quantize_dense(quant, scale, r, values);
        // Factor masking: every entry was sent.
        u.fill(0.0);
        let crc = crc32c(&out[..total - CHECKSUM_LEN]);
        out[total - CHECKSUM_LEN..total].copy_from_slice(&crc.to_le_bytes());
        Ok(Some(total))
    }

    /// Accumulates the gradient into the residual and picks the entries to send.
    /// Returns the pick, the target count and, in adaptive threshold mode, how many entries
    /// crossed `Wt` (more than were picked when the byte budget held some back).
    fn select(
        &mut self,
        passes: Passes,
        st: &mut State<'_>,
        g: &[f32],
        scratch: &mut [u32],
    ) -> Result<(Picked, usize, Option<usize>), Error> {
        let n = self.numel;
        let m = self.config.momentum;
        match self.config.selection {
            Selection::Dense => {
                st.accumulate(passes, m, g, None, &mut [])?;
                Ok((Picked::All, n, None))
            }
            Selection::Threshold(wt) => {
                Ok((self.threshold_pick(passes, st, g, scratch, wt)?, n, None))
            }
            Selection::TopK { density, exact } => {
                let k = k_for_density(density, n);
                Ok((self.top_k(passes, st, g, scratch, k, exact)?, k, None))
            }
            Selection::Adaptive(target) => {
                let quant = self.config.quant;
                let mut k = self.controller.target_count(target, n, quant.code_bits());
                // A byte target is a budget: no message is longer, whatever the threshold.
                let most = match target {
                    Target::Bytes(b) => entries_within(b as usize, n, quant),
                    Target::Density(_) => n,
                };
                k = k.min(most);
                if self.controller.threshold > 0.0 {
                    let wt = self.controller.threshold;
                    let picked = self.threshold_pick(passes, st, g, scratch, wt)?;
                    let crossed = match picked {
                        Picked::List { len, .. } => len,
                        Picked::Scan { limit, .. } => limit,
                        Picked::All => n,
                    };
                    let picked = keep_largest(passes, picked, st.now().0, scratch, most);
                    Ok((picked, k, Some(crossed)))
                } else if k == 0 {
                    st.accumulate(passes, m, g, None, &mut [])?;
                    Ok((
                        Picked::List {
                            start: 0,
                            len: 0,
                            mags: None,
                        },
                        0,
                        None,
                    ))
                } else {
                    Ok((self.top_k(passes, st, g, scratch, k, false)?, k, None))
                }
            }
        }
    }

    fn threshold_pick(
        &self,
        passes: Passes,
        st: &mut State<'_>,
        g: &[f32],
        scratch: &mut [u32],
        wt: f32,
    ) -> Result<Picked, Error> {
        let t = mag_bits(wt);
        let cap = threshold_list_cap(self.numel).min(scratch.len());
        let count = st.accumulate(
            passes,
            self.config.momentum,
            g,
            Some(t),
            &mut scratch[..cap],
        )?;
        Ok(if count <= cap {
            Picked::List {
                start: 0,
                len: count,
                mags: None,
            }
        } else {
            // `limit` is the count: every entry at or above `t`.
            Picked::Scan {
                above: t,
                ties: usize::MAX,
                limit: count,
            }
        })
    }

    fn top_k(
        &self,
        passes: Passes,
        st: &mut State<'_>,
        g: &[f32],
        scratch: &mut [u32],
        k: usize,
        exact: bool,
    ) -> Result<Picked, Error> {
        let n = self.numel;
        let m = self.config.momentum;
        let plan = SamplePlan::new(n, k);
        if k == 0 {
            st.accumulate(passes, m, g, None, &mut [])?;
            return Ok(Picked::List {
                start: 0,
                len: 0,
                mags: None,
            });
        }
        if plan.exact {
            st.accumulate(passes, m, g, None, &mut [])?;
            return Ok(exact_top_k(passes, st.now().0, &mut scratch[..n], k));
        }

        // DGC sampled threshold: sample v on the fly (before the state changes), so the
        // candidates can be gathered during the accumulation pass itself. The exact top-k
        // takes the same path with a lower threshold (aiming at 1.5k candidates): when at
        // least k arrive, they hold the k largest, and the exact selection among them is
        // the exact selection among all.
        let (sample, rest) = scratch.split_at_mut(plan.sample);
        let (list, rest) = rest.split_at_mut(plan.cap);
        let cand_mags = &mut rest[..plan.cap];
        let stream = rng::stream(self.config.seed, self.step, Purpose::Sampling);
        // Stratified: one run of `RUN` adjacent elements at a uniformly random place in each
        // of `strata` equal parts (the last part takes the remainder). Runs and increasing
        // positions cut the random reads (each lands on its own page) by `RUN`, and the next
        // runs are fetched while this one is read.
        const RUN: usize = 4;
        const AHEAD: usize = 16;
        let strata = plan.sample.div_ceil(RUN);
        let width = n / strata; // >= 2 * RUN: a sampled plan has sample <= n / 2
        let last = strata - 1;
        let start = |j: usize| {
            let span = if j == last { n - j * width } else { width } - RUN + 1;
            j * width + rng::below(stream, j as u32, span as u32) as usize
        };
        let (r_read, u_read) = st.now();
        let fill = |offset: usize, part: &mut [u32]| {
            let (r, u) = (r_read, u_read);
            for (j, run) in (offset / RUN..).zip(part.chunks_mut(RUN)) {
                if j + AHEAD <= last {
                    let p = start(j + AHEAD);
                    prefetch(r, p);
                    prefetch(g, p);
                    prefetch(u, p);
                }
                let s = start(j);
                for (d, i) in run.iter_mut().zip(s..) {
                    let (ri, ui, gi) = (r[i], u.get(i).copied().unwrap_or(0.0), g[i]);
                    *d = mag_bits(accumulate_one(m, ri, ui, gi).0);
                }
            }
        };
        // Random reads wait on memory latency, so threads help here too.
        passes.for_parts(sample, RUN, 8192, fill);
        let (mut aim, enough) = if exact {
            (1.5 * k as f64, k)
        } else {
            (1.2 * k as f64, ceil_usize(0.8 * k as f64))
        };
        let mut t = kth_largest(sample, plan.hits_for(n, aim)).0.max(1);
        let mut count = st.accumulate(passes, m, g, Some(t), list)?;
        // From here on `r` holds v: the re-estimates are read-only passes.
        let r = st.now().0;
        // Re-estimate a few times if the sample misled us.
        for _ in 0..4 {
            let low = count < enough;
            if count > plan.cap {
                aim *= 0.6;
            } else if low && t > 1 {
                aim *= 1.6;
            } else {
                break;
            }
            let h = plan.hits_for(n, aim);
            t = kth_largest(sample, h).0.max(1);
            if low && h == plan.sample {
                t = 1; // the whole sample is below the target: take every non-zero
            }
            count = passes.gather(r, t, list);
        }
        if exact && !(k..=plan.cap).contains(&count) {
            // The estimates missed: select among all magnitudes (r already holds v).
            return Ok(exact_top_k(passes, r, &mut scratch[..n], k));
        }
        if count > plan.cap {
            // Still overflowing (e.g. many equal magnitudes): the first k at or above t.
            return Ok(Picked::Scan {
                above: t,
                ties: usize::MAX,
                limit: k,
            });
        }
        let mut mags = None;
        if count > k {
            let (kept, in_order) =
                trim_candidates(passes, r, &mut list[..count], cand_mags, Some(sample), k);
            count = kept;
            mags = in_order.then_some(0); // the sample's place
        }
        Ok(Picked::List {
            start: plan.sample,
            len: count,
            mags,
        })
    }
}

/// Keeps the `k` largest magnitudes of the candidates in `list` (ties: lower index), in
/// order; returns how many remain. `mags` needs `list.len()` words; `in_order`, when it has
/// room, saves reading `r` at random places a second time and ends holding the kept
/// entries' magnitudes in list order (then the second result is true). `k < list.len()`.
fn trim_candidates(
    passes: Passes,
    r: &[f32],
    list: &mut [u32],
    mags: &mut [u32],
    in_order: Option<&mut [u32]>,
    k: usize,
) -> (usize, bool) {
    let count = list.len();
    // Random reads wait on memory latency: threads keep more of them in flight.
    let candidates = &*list;
    passes.for_parts(
        &mut mags[..count],
        64,
        MIN_PICKED_PER_PART,
        |offset, part| {
            let list = &candidates[offset..];
            for (j, (d, &i)) in part.iter_mut().zip(list).enumerate() {
                prefetch_ahead(r, list, j, 0);
                *d = mag_bits(r[i as usize]);
            }
        },
    );
    // The selection reorders the magnitudes; keep them in list order too.
    let mut in_order = in_order.and_then(|o| o.get_mut(..count));
    if let Some(copy) = &mut in_order {
        copy.copy_from_slice(&mags[..count]);
    }
    let (tk, greater) = kth_largest(&mut mags[..count], k);
    let mut ties = k - greater;
    let mut kept = 0;
    for j in 0..count {
        let i = list[j];
        let mag = match &in_order {
            Some(mags) => mags[j],
            None => mag_bits(r[i as usize]),
        };
        let keep = mag > tk || (mag == tk && ties > 0);
        if mag == tk && keep {
            ties -= 1;
        }
        if keep {
            list[kept] = i;
            if let Some(mags) = &mut in_order {
                mags[kept] = mag; // kept <= j: that slot was read already
            }
            kept += 1;
        }
    }
    (kept, in_order.is_some())
}

/// At most `most` of the picked entries: the largest (ties: lower index) when the
/// candidates are listed and there is scratch to rank them, else an exact selection over
/// all of `v` (in `r`).
fn keep_largest(
    passes: Passes,
    picked: Picked,
    r: &[f32],
    scratch: &mut [u32],
    most: usize,
) -> Picked {
    match picked {
        Picked::List { start: 0, len, .. } if len > most => {
            let (list, rest) = scratch.split_at_mut(len);
            if most == 0 {
                Picked::List {
                    start: 0,
                    len: 0,
                    mags: None,
                }
            } else if rest.len() >= len {
                // With room, the kept magnitudes stay in list order after the work area.
                let (work, in_order) = rest.split_at_mut(len);
                let in_order = Some(in_order).filter(|o| o.len() >= len);
                let (kept, in_order) = trim_candidates(passes, r, list, work, in_order, most);
                Picked::List {
                    start: 0,
                    len: kept,
                    mags: in_order.then_some(2 * len),
                }
            } else {
                exact_top_k(passes, r, &mut scratch[..r.len()], most)
            }
        }
        Picked::Scan { limit, .. } if limit > most => {
            let n = r.len();
            match scratch.get_mut(..n) {
                Some(mags) if most > 0 => exact_top_k(passes, r, mags, most),
                _ => Picked::Scan {
                    above: u32::MAX,
                    ties: 0,
                    limit: 0,
                },
            }
        }
        other => other,
    }
}

/// The exact top-k of `v` (in `r`) by a selection over all magnitudes: the `k` largest,
/// ties broken by lower index; with fewer than `k` non-zeros, those.
fn exact_top_k(passes: Passes, r: &[f32], mags: &mut [u32], k: usize) -> Picked {
    passes.magnitudes(r, mags);
    let (t, greater) = kth_largest(mags, k);
    if t == 0 {
        // Zeros are never worth sending.
        Picked::Scan {
            above: 0,
            ties: 0,
            limit: usize::MAX,
        }
    } else {
        Picked::Scan {
            above: t,
            ties: k - greater,
            limit: usize::MAX,
        }
    }
}

/// Statistics of the picked magnitudes (as bits) for the scale and the controller.
#[derive(Clone, Copy)]
struct MagStats {
    count: usize,
    max: u32,
    min: u32,
    /// Σ |v| in list order (only when the quantiser needs it).
    sum_abs: f64,
}

impl MagStats {
    const fn new() -> Self {
        MagStats {
            count: 0,
            max: 0,
            min: u32::MAX,
            sum_abs: 0.0,
        }
    }

    #[inline(always)]
    fn push(&mut self, mag: u32, sum: bool) {
        self.count += 1;
        self.max = self.max.max(mag);
        self.min = self.min.min(mag);
        if sum {
            self.sum_abs += f32::from_bits(mag) as f64;
        }
    }

    /// Adds the statistics of the entries after these (the sums are not merged).
    fn merge(&mut self, next: &MagStats) {
        self.count += next.count;
        self.max = self.max.max(next.max);
        self.min = self.min.min(next.min);
    }
}

/// At most this many parts for the passes over the picked entries.
const PICKED_PARTS: usize = 16;
/// Fewer picked entries than this per part stay on one thread.
const MIN_PICKED_PER_PART: usize = 4096;
/// Parts start on multiples of this many entries, so every part's value codes start on a
/// byte: 8 codes of any width, or 5 ternary digits, fill whole bytes.
const PICKED_ALIGN: usize = 40;

/// The picked list and its part length when the passes over the picked entries are worth
/// splitting over threads (a long list, more than one thread); `None` otherwise.
fn picked_split(passes: Passes, picked: Picked, scratch: &[u32]) -> Option<(&[u32], usize)> {
    let Picked::List { start, len, .. } = picked else {
        return None;
    };
    if cfg!(not(feature = "std")) {
        return None; // one thread: the split would only cost stack
    }
    let parts = passes
        .threads
        .min(PICKED_PARTS)
        .min(len / MIN_PICKED_PER_PART);
    let list = scratch.get(start..start + len)?;
    (parts > 1).then(|| (list, len.div_ceil(parts).next_multiple_of(PICKED_ALIGN)))
}

/// One part of pass 2: its entries, and the parts of the residual, velocity and value block
/// they alone touch (the list is increasing, so each part's indices form one range).
#[derive(Default)]
struct ValuesJob<'a> {
    entries: &'a [u32],
    /// The index of `r[0]` and `u[0]`.
    first: usize,
    r: &'a mut [f32],
    u: &'a mut [f32],
    values: &'a mut [u8],
    /// The whole index stream, written by this part's thread too (the first part's).
    index: Option<IndexWriter<'a>>,
    ok: bool,
}

/// Pass 1's value statistics over parts of `list` (of `part` entries) on threads; without
/// the sum of `|v|`. Out of line: its per-part state stays off the one-thread path's stack
/// (2 KiB on a microcontroller).
#[inline(never)]
fn split_stats(passes: Passes, list: &[u32], part: usize, r: &[f32]) -> MagStats {
    let mut parts = [(&[][..], MagStats::new()); PICKED_PARTS];
    for (slot, entries) in parts.iter_mut().zip(list.chunks(part)) {
        slot.0 = entries;
    }
    passes.each(&mut parts[..list.chunks(part).len()], |(entries, part)| {
        for (j, &i) in entries.iter().enumerate() {
            prefetch_ahead(r, entries, j, 0);
            if let Some(v) = r.get(i as usize) {
                part.push(mag_bits(*v), false);
            }
        }
    });
    let mut all = MagStats::new();
    parts.iter().for_each(|(_, part)| all.merge(part));
    all
}

/// Pass 2 over parts of `list` (of `part` entries) on threads: each part writes its value
/// codes and residual updates, the first part's thread the index stream too. Whether
/// everything fit. Out of line, as [`split_stats`].
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn split_emit(
    passes: Passes,
    list: &[u32],
    part: usize,
    q: &Quantizer,
    indices: IndexWriter<'_>,
    r: &mut [f32],
    u: &mut [f32],
    values: &mut [u8],
) -> bool {
    let mut jobs = split_values(list, part, q.quant, r, u, values);
    jobs[0].index = Some(indices);
    let used = list.chunks(part).len();
    passes.each(&mut jobs[..used], |job| {
        if let Some(indices) = &mut job.index {
            list.iter().for_each(|&i| indices.push(i as usize));
        }
        let mut values = ValueWriter::new(q.quant, core::mem::take(&mut job.values));
        for (j, &i) in job.entries.iter().enumerate() {
            prefetch_ahead(job.r, job.entries, j, job.first);
            let at = i as usize - job.first;
            if let Some(v) = job.r.get_mut(at) {
                emit_value(q, &mut values, i, v);
            }
            if let Some(u) = job.u.get_mut(at) {
                *u = 0.0; // factor masking
            }
        }
        job.ok = values.finish();
    });
    let indices_ok = jobs[0].index.take().is_some_and(IndexWriter::finish);
    indices_ok && jobs[..used].iter().all(|j| j.ok)
}

/// Splits the residual, velocity (empty, or as long as the residual) and value block
/// along the parts of `list` (of `part` entries, a multiple of [`PICKED_ALIGN`]).
fn split_values<'a>(
    list: &'a [u32],
    part: usize,
    quant: Quant,
    mut r: &'a mut [f32],
    mut u: &'a mut [f32],
    mut values: &'a mut [u8],
) -> [ValuesJob<'a>; PICKED_PARTS] {
    let mut jobs: [ValuesJob<'a>; PICKED_PARTS] = Default::default();
    let mut first = 0;
    for (j, (job, entries)) in jobs.iter_mut().zip(list.chunks(part)).enumerate() {
        // The next part's first index ends this part's range; the last part takes the rest.
        let (r_len, v_len) = match list.get((j + 1) * part) {
            // Its codes fill whole bytes (a multiple of PICKED_ALIGN): the next part starts on one.
            Some(&next) => {
                let bytes = quant.value_bytes(entries.len() as u64).unwrap_or(0);
                (next as usize - first, bytes as usize)
            }
            None => (r.len(), values.len()),
        };
        let (r_at, u_at, v_at) = (
            r_len.min(r.len()),
            r_len.min(u.len()),
            v_len.min(values.len()),
        );
        let (r_part, r_rest) = core::mem::take(&mut r).split_at_mut(r_at);
        let (u_part, u_rest) = core::mem::take(&mut u).split_at_mut(u_at);
        let (v_part, v_rest) = core::mem::take(&mut values).split_at_mut(v_at);
        *job = ValuesJob {
            entries,
            first,
            r: r_part,
            u: u_part,
            values: v_part,
            index: None,
            ok: true,
        };
        (r, u, values) = (r_rest, u_rest, v_rest);
        first += r_len;
    }
    jobs
}

/// How far ahead of use the passes over picked entries fetch them: random reads of the
/// residual wait on memory, and a loop body as long as pass 2's keeps few of them in
/// flight by itself.
const READ_AHEAD: usize = 16;

/// Hints `x[list[j + READ_AHEAD] - first]` into cache.
#[inline(always)]
fn prefetch_ahead(x: &[f32], list: &[u32], j: usize, first: usize) {
    if let Some(&i) = list.get(j + READ_AHEAD) {
        prefetch(x, (i as usize).wrapping_sub(first));
    }
}

/// Writes the code of `*v` and leaves the quantisation error in `v`.
#[inline(always)]
fn emit_value(q: &Quantizer, values: &mut ValueWriter<'_>, index: u32, v: &mut f32) {
    let code = q.encode(*v, index);
    values.push(code);
    *v -= q.decode(code);
}

/// Calls `f(index, &mut v)` for each picked entry in increasing index order.
#[inline(always)]
fn for_each_picked(
    picked: Picked,
    scratch: &[u32],
    r: &mut [f32],
    mut f: impl FnMut(usize, &mut f32),
) {
    match picked {
        Picked::All => {
            for (i, v) in r.iter_mut().enumerate() {
                f(i, v);
            }
        }
        Picked::List { start, len, .. } => {
            let list = scratch.get(start..start + len).unwrap_or(&[]);
            for (j, &i) in list.iter().enumerate() {
                prefetch_ahead(r, list, j, 0);
                if let Some(v) = r.get_mut(i as usize) {
                    f(i as usize, v);
                }
            }
        }
        Picked::Scan {
            above,
            mut ties,
            limit,
        } => {
            let mut taken = 0;
            for (i, v) in r.iter_mut().enumerate() {
                let mag = mag_bits(*v);
                if mag > above || (mag == above && ties > 0) {
                    if mag == above {
                        ties -= 1;
                    }
                    if taken == limit {
                        break;
                    }
                    taken += 1;
                    f(i, v);
                }
            }
        }
    }
}

/// Packs value codes: fixed-width bit fields, or five base-3 digits per byte for ternary.
enum ValueWriter<'a> {
    Bits {
        bits: BitWriter<'a>,
        width: u32,
    },
    Trits {
        out: &'a mut [u8],
        pos: usize,
        acc: u32,
        weight: u32,
        ok: bool,
    },
}

impl<'a> ValueWriter<'a> {
    fn new(quant: Quant, out: &'a mut [u8]) -> Self {
        match quant {
            Quant::Ternary => ValueWriter::Trits {
                out,
                pos: 0,
                acc: 0,
                weight: 1,
                ok: true,
            },
            q => ValueWriter::Bits {
                bits: BitWriter::new(out),
                width: q.code_bits(),
            },
        }
    }

    #[inline(always)]
    fn push(&mut self, code: u32) {
        match self {
            ValueWriter::Bits { bits, width } => bits.put(code, *width),
            ValueWriter::Trits {
                out,
                pos,
                acc,
                weight,
                ok,
            } => {
                *acc += code * *weight;
                *weight *= 3;
                if *weight == 243 {
                    match out.get_mut(*pos) {
                        Some(b) => *b = *acc as u8,
                        None => *ok = false,
                    }
                    *pos += 1;
                    *acc = 0;
                    *weight = 1;
                }
            }
        }
    }

    fn finish(self) -> bool {
        match self {
            ValueWriter::Bits { bits, .. } => bits.finish().is_some(),
            ValueWriter::Trits {
                out,
                pos,
                acc,
                weight,
                ok,
            } => {
                if weight > 1 {
                    match out.get_mut(pos) {
                        Some(b) => *b = acc as u8,
                        None => return false,
                    }
                }
                ok
            }
        }
    }
}
