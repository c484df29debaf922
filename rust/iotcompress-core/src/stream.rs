//! The streaming threshold encoder: for devices that cannot hold a whole gradient. The gradient
//! arrives in chunks (layer by layer, neuron by neuron) and the message is written as it goes;
//! the result is an ordinary wire-format-v1 message (`docs/wire-format.md`) that every decoder
//! reads like any other. The residual (and velocity) may be kept in a compact format
//! ([`StateFormat`]) so that a device with 20 kB of SRAM can train a model of a few thousand
//! parameters.
//!
//! ```
//! use iotcompress_core::{Quant, StreamCompressor, StreamConfig, StreamTarget, StateFormat, decode_add};
//!
//! let n = 300;
//! let config = StreamConfig {
//!     quant: Quant::Int8,
//!     state: StateFormat::Int8,
//!     target: StreamTarget::Count(15),
//!     ..StreamConfig::new(n, 0.5)
//! };
//! let mut c = StreamCompressor::new(config).unwrap();
//! let mut state = vec![0u8; config.state_len()]; // zeros: an all-zero residual
//! let mut out = vec![0u8; config.full_message_len()];
//! let grad: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
//! let mut enc = c.encoder(&mut state, &mut out).unwrap();
//! for layer in grad.chunks(64) {
//!     enc.feed(layer).unwrap(); // e.g. as backprop produces each layer's gradient
//! }
//! let info = enc.finish().unwrap();
//! let mut sum = vec![0.0f32; n];
//! decode_add(&out[..info.bytes], &mut sum, 1.0).unwrap();
//! ```
//!
//! # Update rule, per element, in index order
//!
//! With threshold `Wt` fixed at [`StreamCompressor::begin`] and `r`, `u` the stored residual
//! and velocity:
//!
//! 1. `v = r + g` (or DGC's momentum correction, [`crate::feedback`]: `u ← m·u + g, v = r + u`,
//!    Nesterov `u ← m·(u + g), v = r + u + g`);
//! 2. *selected* iff `|v| ≥ Wt` (Strom, Interspeech 2015; the seed's step one);
//! 3. a selected entry is *sent* if its index and value codes still fit in the output buffer
//!    (otherwise it is *held back*: error feedback keeps all of it for a later message);
//! 4. a sent entry appends its Rice-coded gap and its value code `c = Q(v)`, and stores
//!    `r ← v − D(c)` (`D` is the decoder's value of `c`) and, with momentum, `u ← 0` (DGC's
//!    factor masking); an entry not sent stores `r ← v` and `u` as computed in 1.
//!
//! At [`StreamMessage::finish`]: the header is written in front, the index block and the value
//! block are moved next to it, the CRC-32C is appended, and then the controller is updated.
//!
//! # Error-feedback invariant
//!
//! For every element, with `d` the value the decoder adds (0 if not sent) and `r'` the stored
//! residual afterwards:
//!
//! `d + r' = v + ε + η`, where `v` is the accumulated value of step 1 computed in f32, and
//!
//! * `ε = 0` with f32 values (then `r' = 0` for sent entries: **bit-exact** with f32 state);
//!   otherwise `ε` is the rounding of one f32 subtraction `v − d`, `|ε| ≤ 2^-24·|v − d|`
//!   (zero for f16/bf16 values short of f16's saturation, where `d` is within a factor two
//!   of `v` (Sterbenz));
//! * `η = 0` with [`StateFormat::F32`]; otherwise `η` is the rounding of the compact state
//!   applied to `x = v − d` (see [`StateFormat`]): `|η| ≤ 2^-11·|x| + 2^-25` for f16
//!   (`|x| ≤ 65504`; beyond that it saturates to ±65504), `|η| ≤ 2^-8·|x| + 2^-134` for bf16,
//!   and `|η| ≤ (1/2 + 2^-15)·s_b` (+ `2^-142` if `s_b` is subnormal) for int8, where
//!   `s_b = max_{j in block} |x_j| / 127` is the scale of the element's block of
//!   [`StateFormat::BLOCK`] elements.
//!
//! The velocity is rounded the same way (`u' = Q(u)`, or 0 where sent).
//!
//! # Choices made up front
//!
//! `nnz` and the values are not known when the message starts, so the encoder fixes at
//! [`StreamCompressor::begin`] what the batch encoder measures. Decoders accept these
//! non-canonical choices (wire format, *Stability*); the bytes are still a function of the
//! inputs alone, whatever the chunking.
//!
//! * **Index coding**: always Golomb–Rice, with the `k` that minimises the bound
//!   `K·(k+1) + ((n − K) >> k)` bits for the `K` entries expected (ties to the smaller `k`):
//!   `K` is the controller's target count in adaptive mode, otherwise the number selected by
//!   the previous message (`⌊n/64⌋` before the first), at least 1 and at most what the
//!   output buffer holds at `value bits + 8` bits an entry; and `k` is never so small that
//!   one entry anywhere in the tensor would not fit in the buffer (`(n >> k) + k + 1 +
//!   value bits` bits), so a small buffer always makes progress.
//! * **Scale of int8/int4 values**: `scale = S/127` (`S/7`), with
//!   `S = max(M_prev, 2·Wt)`, where `M_prev` is the largest `|v|` selected by the previous
//!   message (0 before the first). Codes are `round_half_away(v/scale)` clamped to ±127
//!   (±7); a clamped entry sends `±127·scale` and error feedback keeps the excess in the
//!   residual for the next messages (`ε` above covers it: nothing is lost).
//! * **Layout while streaming**: the maximum header length ([`StreamConfig::header_reserve`])
//!   is reserved at the start of the output buffer, the index block grows after it, and the
//!   value codes grow backwards from the end of the buffer (less 4 bytes for the CRC). At
//!   finish the value bytes are reversed in place and both blocks are moved down behind the
//!   real header. An output buffer of any size from [`StreamConfig::min_message_len`] works:
//!   a selected entry whose codes would not fit is held back (step 3), so the message never
//!   exceeds the buffer. [`StreamConfig::full_message_len`] holds every message whose index
//!   block is no larger than a bitmap (always, unless many more entries than expected cross
//!   `Wt` at a large `k`).
//!
//! # The adaptive threshold
//!
//! With [`StreamTarget::Count`] or [`StreamTarget::Bytes`] the threshold is the
//! [`ThresholdController`]'s, starting from [`StreamConfig::threshold`], and after each message
//! it moves by the batch compressor's rule `Wt ← Wt · clamp((selected / target)^(1/8), 0.7,
//! 1.4)` (see [`ThresholdController`]), computed here in f32 (three Newton square roots), so
//! that a Cortex-M4F links no double-precision code; `bits_per_entry` is measured from the
//! entries sent. The count compared with the target is the number *selected*, so that held-back
//! entries still raise `Wt`. The target count of a byte budget `B` is
//! `⌊max(B − 16, 8)·8 / bits_per_entry⌋` (value bits + 12 before the first message), clamped
//! to `1..=n`, as in the batch compressor. `B` is a target here, not a bound: what bounds a
//! streamed message is the output buffer (give it `B` bytes to make `B` a budget, as
//! `iotcompress_network_budget_bytes` suggests); the batch compressor bounds its messages by
//! `B` itself ([`crate::select::entries_within`]).

use crate::feedback::{accumulate_one, Momentum};
use crate::float::{
    abs, bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, is_finite_bits, mag_bits,
    round_half_away, sqrt_f32 as sqrt,
};
use crate::quant::Quant;
use crate::select::ThresholdController;
use crate::wire::crc::crc32c;
use crate::wire::{varint_len, Header, IndexCoding, CHECKSUM_LEN, MAX_HEADER_LEN};
use crate::Error;

/// How the residual and velocity are stored, in a caller-owned byte buffer (little-endian).
///
/// | format | bytes per element | layout | rounding of a stored value `x` |
/// | --- | --- | --- | --- |
/// | `F32` | 4 | binary32 | exact |
/// | `F16` | 2 | IEEE binary16, RNE | `≤ 2^-11·\|x\| + 2^-25`, saturates beyond ±65504 |
/// | `Bf16` | 2 | bfloat16, RNE | `≤ 2^-8·\|x\| + 2^-134` |
/// | `Int8` | `1 + 4/32` | per block of 32: f32 scale `s_b = max\|x\|/127`, then 32 codes `round_half_away(x·(1/s_b))` | `≤ (1/2 + 2^-15)·s_b` (`+ 2^-142` if `s_b` is subnormal) |
///
/// An all-zero buffer is an all-zero state in every format. With int8 the encoder keeps the
/// new values of the current block in [`StreamMessage`] until the block is complete, then
/// quantises the whole block with its own scale, so chunk boundaries never matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateFormat {
    /// float32: exact.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit codes with one f32 scale per block of [`StateFormat::BLOCK`] elements.
    Int8,
}

impl StateFormat {
    /// Elements per scale block of [`StateFormat::Int8`].
    pub const BLOCK: usize = 32;

    /// Bytes of one block of [`StateFormat::Int8`]: the scale, then the codes.
    const BLOCK_BYTES: usize = 4 + Self::BLOCK;

    /// Bytes of one stored tensor (residual or velocity) of `numel` elements (saturating).
    pub const fn tensor_bytes(self, numel: usize) -> usize {
        match self {
            StateFormat::F32 => numel.saturating_mul(4),
            StateFormat::F16 | StateFormat::Bf16 => numel.saturating_mul(2),
            StateFormat::Int8 => {
                numel.saturating_add(numel.div_ceil(Self::BLOCK).saturating_mul(4))
            }
        }
    }

    /// The stored value of element `i` (0 outside the buffer).
    #[inline]
    fn load(self, buf: &[u8], i: usize) -> f32 {
        match self {
            StateFormat::F32 => match buf.get(4 * i..4 * i + 4) {
                Some(b) => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                None => 0.0,
            },
            StateFormat::F16 | StateFormat::Bf16 => match buf.get(2 * i..2 * i + 2) {
                Some(b) => {
                    let h = u16::from_le_bytes([b[0], b[1]]);
                    if self == StateFormat::F16 {
                        f16_to_f32(h)
                    } else {
                        bf16_to_f32(h)
                    }
                }
                None => 0.0,
            },
            StateFormat::Int8 => {
                let at = (i / Self::BLOCK) * Self::BLOCK_BYTES;
                match (buf.get(at..at + 4), buf.get(at + 4 + i % Self::BLOCK)) {
                    (Some(s), Some(&c)) => {
                        (c as i8) as f32 * f32::from_le_bytes([s[0], s[1], s[2], s[3]])
                    }
                    _ => 0.0,
                }
            }
        }
    }

    /// Stores element `i` (F32, F16, Bf16; Int8 goes through [`StateFormat::store_block`]).
    #[inline]
    fn store(self, buf: &mut [u8], i: usize, x: f32) {
        match self {
            StateFormat::F32 => {
                if let Some(b) = buf.get_mut(4 * i..4 * i + 4) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
            }
            StateFormat::F16 | StateFormat::Bf16 => {
                let h = if self == StateFormat::F16 {
                    f32_to_f16(x)
                } else {
                    f32_to_bf16(x)
                };
                if let Some(b) = buf.get_mut(2 * i..2 * i + 2) {
                    b.copy_from_slice(&h.to_le_bytes());
                }
            }
            StateFormat::Int8 => {}
        }
    }

    /// Quantises block `b` of an int8 tensor from its new values.
    fn store_block(buf: &mut [u8], b: usize, values: &[f32]) {
        let max = values.iter().fold(0u32, |m, &x| m.max(mag_bits(x)));
        let scale = int_scale(f32::from_bits(max), 127.0);
        let at = b * Self::BLOCK_BYTES;
        if let Some(s) = buf.get_mut(at..at + 4) {
            s.copy_from_slice(&scale.to_le_bytes());
        }
        // A multiplication by the reciprocal (a division only for a subnormal scale, whose
        // reciprocal would overflow): far cheaper than 32 divisions without an FPU.
        let inv = if scale >= f32::MIN_POSITIVE {
            1.0 / scale
        } else {
            0.0
        };
        for (j, &x) in values.iter().enumerate() {
            if let Some(c) = buf.get_mut(at + 4 + j) {
                *c = if inv > 0.0 {
                    round_half_away(x * inv).clamp(-127, 127)
                } else {
                    quantize(x, scale, 127)
                } as u8;
            }
        }
    }
}

/// What the threshold aims at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamTarget {
    /// `Wt` stays [`StreamConfig::threshold`].
    Fixed,
    /// Adaptive: this many selected entries per message (> 0).
    Count(u32),
    /// Adaptive: messages of about this many bytes (> 0).
    Bytes(u32),
}

/// Everything that shapes a streamed message.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamConfig {
    /// Elements of the whole gradient (at most `u32::MAX`).
    pub numel: usize,
    /// The threshold `Wt` (finite, > 0): fixed, or the adaptive controller's starting point.
    pub threshold: f32,
    /// Fixed or adaptive threshold.
    pub target: StreamTarget,
    /// Value quantiser: f32, f16, bf16, int8 or int4 (the others need the whole selection
    /// before the first code and are refused with [`Error::InvalidConfig`]).
    pub quant: Quant,
    /// Momentum correction (the velocity is stored in the same format as the residual).
    pub momentum: Momentum,
    /// How the residual (and velocity) are stored.
    pub state: StateFormat,
}

impl StreamConfig {
    /// Fixed threshold `threshold`, f32 values, f32 state, no momentum.
    pub const fn new(numel: usize, threshold: f32) -> Self {
        StreamConfig {
            numel,
            threshold,
            target: StreamTarget::Fixed,
            quant: Quant::F32,
            momentum: Momentum::None,
            state: StateFormat::F32,
        }
    }

    /// Checks every option's range and that the sizes fit in `usize`.
    pub fn validate(&self) -> Result<(), Error> {
        let quant_ok = matches!(
            self.quant,
            Quant::F32 | Quant::F16 | Quant::Bf16 | Quant::Int8 | Quant::Int4
        );
        let target_ok = !matches!(self.target, StreamTarget::Count(0) | StreamTarget::Bytes(0));
        let m = self.momentum.factor();
        let momentum_ok = (0.0..1.0).contains(&m);
        let wt_ok = self.threshold > 0.0 && is_finite_bits(self.threshold.to_bits());
        let n = self.numel as u64;
        // Every size (state, full message) is below `(4n + 64)·2`.
        let sizes_ok = n <= u32::MAX as u64 && (n * 4 + 64) * 2 <= usize::MAX as u64;
        if quant_ok && target_ok && momentum_ok && wt_ok && sizes_ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig)
        }
    }

    /// Bytes of the state buffer: the residual, then (with momentum) the velocity.
    pub const fn state_len(&self) -> usize {
        let one = self.state.tensor_bytes(self.numel);
        match self.momentum {
            Momentum::None => one,
            _ => one.saturating_mul(2),
        }
    }

    /// Bytes reserved at the start of the output for the header: the longest header of this
    /// configuration (`nnz` as long as `numel`, the Rice parameter, the scale).
    pub const fn header_reserve(&self) -> usize {
        let n = if self.numel > u32::MAX as usize {
            u32::MAX
        } else {
            self.numel as u32
        };
        4 + 2 * varint_len(n) + 1 + if self.quant.has_scale() { 4 } else { 0 }
    }

    /// The smallest output buffer [`StreamCompressor::begin`] accepts (every selected entry
    /// is then held back).
    pub const fn min_message_len(&self) -> usize {
        self.header_reserve() + CHECKSUM_LEN
    }

    /// The recommended output buffer, [`crate::max_encoded_len`] (bitmap-sized index, every
    /// value):
    /// nothing is held back unless the Rice block outgrows a bitmap (many more entries than
    /// expected crossing `Wt`).
    pub const fn full_message_len(&self) -> usize {
        // `max_encoded_len` for the quantisers a stream takes, without its 64-bit division
        // (ternary's), which a Cortex-M would link for nothing.
        let n = self.numel;
        let values = (n as u64 * self.quant.code_bits() as u64).div_ceil(8);
        MAX_HEADER_LEN + n.div_ceil(8) + values as usize + CHECKSUM_LEN
    }

    fn value_bytes(&self, nnz: u32) -> u64 {
        let n = nnz as u64;
        match self.quant {
            Quant::Int4 => n.div_ceil(2),
            Quant::Int8 => n,
            Quant::F16 | Quant::Bf16 => 2 * n,
            _ => 4 * n,
        }
    }
}

/// What one streamed message contains.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StreamInfo {
    /// Bytes of the message, at the start of the output buffer.
    pub bytes: usize,
    /// Entries sent.
    pub nnz: usize,
    /// Entries with `|v| ≥ Wt` (sent or held back for lack of space).
    pub selected: usize,
    /// The threshold `Wt` of this message.
    pub threshold: f32,
    /// The value scale of this message (int8/int4; 0 otherwise).
    pub scale: f32,
}

/// The state kept between messages: configuration, the threshold controller and what the
/// next message's up-front choices are made of. A few words; the residual lives in the
/// caller's state buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamCompressor {
    config: StreamConfig,
    /// The adaptive threshold (0: not started, [`StreamConfig::threshold`] is used).
    pub controller: ThresholdController,
    /// Messages finished so far.
    pub messages: u64,
    /// The largest `|v|` selected by the last message that selected any (0 before).
    pub last_max: f32,
    /// Entries selected by the last message.
    pub last_selected: u32,
}

impl StreamCompressor {
    /// A compressor with no history. The caller's state buffer must be zeroed before the
    /// first message.
    pub fn new(config: StreamConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(StreamCompressor {
            config,
            controller: ThresholdController::new(),
            messages: 0,
            last_max: 0.0,
            last_selected: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StreamConfig {
        &self.config
    }

    /// The threshold the next message will use.
    pub fn threshold(&self) -> f32 {
        let t = self.controller.threshold;
        match self.config.target {
            StreamTarget::Fixed => self.config.threshold,
            _ if t > 0.0 && is_finite_bits(t.to_bits()) => t,
            _ => self.config.threshold,
        }
    }

    /// The stored residual of element `i` of a state buffer (0 outside it).
    pub fn residual_at(&self, state: &[u8], i: usize) -> f32 {
        self.config.state.load(state, i)
    }

    /// The stored velocity of element `i` (0 without momentum).
    pub fn velocity_at(&self, state: &[u8], i: usize) -> f32 {
        if !self.config.momentum.has_velocity() {
            return 0.0;
        }
        let at = self.config.state.tensor_bytes(self.config.numel);
        self.config.state.load(state.get(at..).unwrap_or(&[]), i)
    }

    /// The controller's target count for the next message (0 with a fixed threshold).
    fn target_count(&self) -> u32 {
        let n = self.config.numel as u32;
        let count = match self.config.target {
            StreamTarget::Fixed => return 0,
            StreamTarget::Count(c) => c,
            StreamTarget::Bytes(b) => {
                let body_bits = b.saturating_sub(16).max(8) as f32 * 8.0;
                let bpe = self.controller.bits_per_entry;
                let bpe = if bpe > 0.0 && is_finite_bits(bpe.to_bits()) {
                    bpe
                } else {
                    (self.config.quant.code_bits() + 12) as f32
                };
                (body_bits / bpe) as u32
            }
        };
        count.max(1).min(n)
    }

    /// Starts a message: fixes `Wt`, the Rice parameter and the value scale, and reserves
    /// the header. `state` must be [`StreamConfig::state_len`] bytes
    /// ([`Error::LengthMismatch`]), `out` at least [`StreamConfig::min_message_len`]
    /// ([`Error::BufferTooSmall`]); both must be passed unchanged to every
    /// [`StreamMessage::feed`] and to [`StreamMessage::finish`].
    pub fn begin(&self, state: &[u8], out: &[u8]) -> Result<StreamMessage, Error> {
        let cfg = &self.config;
        if state.len() != cfg.state_len() {
            return Err(Error::LengthMismatch);
        }
        if out.len() < cfg.min_message_len() {
            return Err(Error::BufferTooSmall);
        }
        let n = cfg.numel as u32;
        let wt = self.threshold();
        let target = self.target_count();
        let expected = match cfg.target {
            StreamTarget::Fixed if self.messages > 0 => self.last_selected,
            StreamTarget::Fixed => n / 64,
            _ => target,
        };
        let scale = match cfg.quant {
            Quant::Int8 | Quant::Int4 => {
                let last = if is_finite_bits(self.last_max.to_bits()) {
                    abs(self.last_max)
                } else {
                    0.0
                };
                let levels = if cfg.quant == Quant::Int8 { 127.0 } else { 7.0 };
                int_scale(last.max(2.0 * wt), levels)
            }
            _ => 0.0,
        };
        Ok(StreamMessage {
            numel: n,
            out_len: out.len(),
            fed: 0,
            selected: 0,
            nnz: 0,
            threshold: wt,
            scale,
            target,
            rice_k: rice_parameter(
                n,
                expected,
                (out.len() - cfg.min_message_len()) as u64 * 8,
                cfg.quant.code_bits(),
            ),
            next: 0,
            index_bytes: 0,
            index_pending: 0,
            index_pending_bits: 0,
            value_bytes: 0,
            max_selected: 0.0,
            closed: false,
            block: [0.0; StateFormat::BLOCK],
            block_velocity: [0.0; StateFormat::BLOCK],
        })
    }

    /// [`StreamCompressor::begin`] with the buffers held by the returned encoder.
    pub fn encoder<'a>(
        &'a mut self,
        state: &'a mut [u8],
        out: &'a mut [u8],
    ) -> Result<StreamEncoder<'a>, Error> {
        let message = self.begin(state, out)?;
        Ok(StreamEncoder {
            compressor: self,
            state,
            out,
            message,
        })
    }

    /// Adds a whole gradient into the state without sending anything: the residual and
    /// velocity a message that selects nothing would store (a round this device skips, or
    /// the undo of a message that was not delivered, from the state before it). The counters
    /// do not move. All or nothing: [`Error::LengthMismatch`] for a wrong state or gradient
    /// length, [`Error::NonFiniteGradient`], [`Error::Overflow`], and nothing changed.
    pub fn accumulate(&self, state: &mut [u8], grad: &[f32]) -> Result<(), Error> {
        let cfg = self.config;
        if state.len() != cfg.state_len() || grad.len() != cfg.numel {
            return Err(Error::LengthMismatch);
        }
        let (r_buf, u_buf) = state.split_at_mut(cfg.state.tensor_bytes(cfg.numel));
        check_accumulation(&cfg, r_buf, u_buf, 0, grad)?;
        let m = cfg.momentum;
        rewrite(&cfg, r_buf, u_buf, |i, r, u| {
            accumulate_one(m, r, u, grad[i])
        });
        Ok(())
    }

    /// Adds an earlier message of this compressor back into the residual (`r += d` for
    /// every entry, then stored in the state format, so exact up to that rounding and one
    /// f32 rounding; the velocity's factor masking is not undone). O(entries) with an f32,
    /// f16 or bf16 state; int8 blocks with an entry are requantised. All or nothing: a
    /// malformed message ([`Error::is_decode_error`]), one for another element count
    /// ([`Error::LengthMismatch`]) or a sum that is not finite ([`Error::Overflow`]) changes
    /// nothing.
    pub fn restore_message(&self, state: &mut [u8], msg: &[u8]) -> Result<(), Error> {
        let cfg = self.config;
        if state.len() != cfg.state_len() {
            return Err(Error::LengthMismatch);
        }
        let parsed = crate::wire::parse(msg, cfg.numel)?;
        if parsed.header.numel as usize != cfg.numel {
            return Err(Error::LengthMismatch);
        }
        let (r_buf, _) = state.split_at_mut(cfg.state.tensor_bytes(cfg.numel));
        let mut finite = true;
        crate::wire::for_each_entry(&parsed, |i, d| {
            finite &= is_finite_bits((cfg.state.load(r_buf, i) + d).to_bits());
        })?;
        if !finite {
            return Err(Error::Overflow);
        }
        // Entries come in increasing index order: gather each block's, then rewrite it.
        let block = if cfg.state == StateFormat::Int8 {
            StateFormat::BLOCK
        } else {
            1
        };
        let mut add = [0.0f32; StateFormat::BLOCK];
        let mut current: Option<usize> = None;
        let flush = |b: usize, add: &mut [f32; StateFormat::BLOCK], r_buf: &mut [u8]| {
            let start = b * block;
            let end = (start + block).min(cfg.numel);
            let mut values = [0.0f32; StateFormat::BLOCK];
            for (k, i) in (start..end).enumerate() {
                values[k] = cfg.state.load(r_buf, i) + add[k];
            }
            if cfg.state == StateFormat::Int8 {
                StateFormat::store_block(r_buf, b, &values[..end - start]);
            } else {
                cfg.state.store(r_buf, start, values[0]);
            }
            *add = [0.0; StateFormat::BLOCK];
        };
        crate::wire::for_each_entry(&parsed, |i, d| {
            let b = i / block;
            if current.is_some_and(|c| c != b) {
                flush(current.unwrap_or(0), &mut add, r_buf);
            }
            current = Some(b);
            add[i % block] += d;
        })?;
        if let Some(b) = current {
            flush(b, &mut add, r_buf);
        }
        Ok(())
    }

    /// One message from a gradient given in one piece (begin, feed, finish).
    pub fn compress(
        &mut self,
        state: &mut [u8],
        grad: &[f32],
        out: &mut [u8],
    ) -> Result<StreamInfo, Error> {
        let mut enc = self.encoder(state, out)?;
        enc.feed(grad)?;
        enc.finish()
    }
}

/// One message in progress: plain numbers (a C program keeps it in a struct between calls).
/// Change nothing: every call re-checks the fields ([`Error::InvalidConfig`] if they do not
/// fit together) and writes only inside the buffers it is given.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamMessage {
    /// Elements of the gradient.
    pub numel: u32,
    /// Bytes of the output buffer given to `begin`.
    pub out_len: usize,
    /// Elements fed so far.
    pub fed: u32,
    /// Entries with `|v| ≥ Wt` so far.
    pub selected: u32,
    /// Entries sent so far.
    pub nnz: u32,
    /// The threshold `Wt` of this message.
    pub threshold: f32,
    /// The value scale (int8/int4), else 0.
    pub scale: f32,
    /// The controller's target count (0 with a fixed threshold).
    pub target: u32,
    /// The Rice parameter of the index block.
    pub rice_k: u32,
    /// Position after the last entry sent (the next gap starts here).
    pub next: u32,
    /// Whole bytes of the index block written after the header reserve.
    pub index_bytes: u32,
    /// Index bits not yet making a whole byte (low `index_pending_bits` bits).
    pub index_pending: u32,
    /// How many bits `index_pending` holds (0..=7).
    pub index_pending_bits: u32,
    /// Bytes of the value block written backwards from the end of the buffer.
    pub value_bytes: u32,
    /// The largest `|v|` selected so far.
    pub max_selected: f32,
    /// Set by `finish`.
    pub closed: bool,
    /// Int8 state: the new residual of the block being processed.
    pub block: [f32; StateFormat::BLOCK],
    /// Int8 state with momentum: the new velocity of the block being processed.
    pub block_velocity: [f32; StateFormat::BLOCK],
}

impl StreamMessage {
    /// Elements fed so far.
    pub fn fed(&self) -> usize {
        self.fed as usize
    }

    /// The end of the value area (the CRC's place at the end of the buffer is kept free).
    fn values_end(&self) -> usize {
        self.out_len - CHECKSUM_LEN
    }

    /// Checks the buffers and that the progress fields fit together.
    fn check(&self, c: &StreamCompressor, state: &[u8], out: &[u8]) -> Result<(), Error> {
        let cfg = &c.config;
        if self.closed {
            return Err(Error::StreamClosed);
        }
        if state.len() != cfg.state_len() || out.len() != self.out_len {
            return Err(Error::LengthMismatch);
        }
        let used = cfg.header_reserve() as u64
            + self.index_bytes as u64
            + (self.index_pending_bits > 0) as u64
            + cfg.value_bytes(self.nnz);
        let ok = self.numel as usize == cfg.numel
            && self.out_len >= cfg.min_message_len()
            && self.fed <= self.numel
            && self.nnz <= self.selected
            && self.selected <= self.fed
            && self.next <= self.fed
            && self.rice_k <= 31
            && self.index_pending_bits < 8
            && self.index_pending >> self.index_pending_bits == 0
            && self.value_bytes as u64 == cfg.value_bytes(self.nnz)
            && used <= self.values_end() as u64
            && self.threshold > 0.0
            && is_finite_bits(self.threshold.to_bits())
            && is_finite_bits(self.scale.to_bits())
            && self.scale >= 0.0
            && is_finite_bits(self.max_selected.to_bits());
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig)
        }
    }

    /// Feeds the next `grad.len()` elements of the gradient.
    ///
    /// Errors leave the state, the output and the message unchanged:
    /// [`Error::LengthMismatch`] (more elements than remain, or other buffers than at
    /// `begin`), [`Error::NonFiniteGradient`], [`Error::Overflow`] (`v` or `u` would not be
    /// finite), [`Error::StreamClosed`] (after `finish`), [`Error::InvalidConfig`] (the
    /// message's fields were changed).
    pub fn feed(
        &mut self,
        c: &StreamCompressor,
        state: &mut [u8],
        out: &mut [u8],
        grad: &[f32],
    ) -> Result<(), Error> {
        self.check(c, state, out)?;
        let start = self.fed as usize;
        if grad.len() > c.config.numel - start {
            return Err(Error::LengthMismatch);
        }
        let cfg = c.config;
        let m = cfg.momentum;
        let (r_buf, u_buf) = state.split_at_mut(cfg.state.tensor_bytes(cfg.numel));
        // Pass 1: nothing changes unless every element accumulates to finite values.
        check_accumulation(&cfg, r_buf, u_buf, start, grad)?;
        // Pass 2: select, send, store.
        let wt = mag_bits(self.threshold);
        let has_velocity = m.has_velocity();
        for (j, &g) in grad.iter().enumerate() {
            let i = start + j;
            let (v, mut u) =
                accumulate_one(m, cfg.state.load(r_buf, i), cfg.state.load(u_buf, i), g);
            let mut r = v;
            if mag_bits(v) >= wt {
                self.selected += 1;
                self.max_selected = self.max_selected.max(abs(v));
                if let Some(d) = self.send(&cfg, out, i as u32, v) {
                    r = v - d;
                    u = 0.0;
                }
            }
            if cfg.state == StateFormat::Int8 {
                let k = i % StateFormat::BLOCK;
                self.block[k] = r;
                self.block_velocity[k] = u;
                if k == StateFormat::BLOCK - 1 || i + 1 == cfg.numel {
                    let b = i / StateFormat::BLOCK;
                    StateFormat::store_block(r_buf, b, &self.block[..=k]);
                    if has_velocity {
                        StateFormat::store_block(u_buf, b, &self.block_velocity[..=k]);
                    }
                }
            } else {
                cfg.state.store(r_buf, i, r);
                if has_velocity {
                    cfg.state.store(u_buf, i, u);
                }
            }
            self.fed += 1;
        }
        Ok(())
    }

    /// Appends entry `i` with value `v` if its codes fit; returns the decoded value.
    fn send(&mut self, cfg: &StreamConfig, out: &mut [u8], i: u32, v: f32) -> Option<f32> {
        let k = self.rice_k;
        let gap = (i - self.next) as u64;
        let code_bits = (gap >> k) + 1 + k as u64;
        let index_bits = self.index_bytes as u64 * 8 + self.index_pending_bits as u64 + code_bits;
        let values = cfg.value_bytes(self.nnz + 1);
        if cfg.header_reserve() as u64 + index_bits.div_ceil(8) + values > self.values_end() as u64
        {
            return None;
        }
        // The index code: the quotient in unary, then k remainder bits.
        let start = cfg.header_reserve();
        let mut ones = gap >> k;
        while ones >= 32 {
            self.put_bits(out, start, u32::MAX, 32);
            ones -= 32;
        }
        self.put_bits(out, start, (1u32 << ones) - 1, ones as u32 + 1);
        self.put_bits(out, start, (gap as u32) & ((1u32 << k) - 1), k);
        // The value code, written backwards from the end of the buffer.
        let (code, decoded, bytes) = match cfg.quant {
            Quant::F16 => {
                let h = f32_to_f16(v);
                (h as u32, f16_to_f32(h), 2)
            }
            Quant::Bf16 => {
                let h = f32_to_bf16(v);
                (h as u32, bf16_to_f32(h), 2)
            }
            Quant::Int8 => {
                let q = quantize(v, self.scale, 127);
                (q as u32 & 0xff, q as f32 * self.scale, 1)
            }
            Quant::Int4 => {
                let q = quantize(v, self.scale, 7);
                (q as u32 & 0xf, q as f32 * self.scale, 0)
            }
            _ => (v.to_bits(), v, 4),
        };
        let end = self.values_end();
        if bytes == 0 {
            // Int4: two codes a byte, the first in the low nibble.
            if self.nnz & 1 == 0 {
                if let Some(b) = out.get_mut(end - 1 - self.value_bytes as usize) {
                    *b = code as u8;
                }
                self.value_bytes += 1;
            } else if let Some(b) = out.get_mut(end - self.value_bytes as usize) {
                *b |= (code as u8) << 4;
            }
        } else {
            for (j, byte) in code.to_le_bytes().iter().take(bytes).enumerate() {
                if let Some(b) = out.get_mut(end - 1 - self.value_bytes as usize - j) {
                    *b = *byte;
                }
            }
            self.value_bytes += bytes as u32;
        }
        self.nnz += 1;
        self.next = i + 1;
        Some(decoded)
    }

    /// Appends the low `n <= 32` bits of `value` to the index block at `out[start..]`.
    fn put_bits(&mut self, out: &mut [u8], start: usize, value: u32, n: u32) {
        let mut acc = self.index_pending as u64 | ((value as u64) << self.index_pending_bits);
        let mut bits = self.index_pending_bits + n;
        while bits >= 8 {
            if let Some(b) = out.get_mut(start + self.index_bytes as usize) {
                *b = acc as u8;
            }
            self.index_bytes += 1;
            acc >>= 8;
            bits -= 8;
        }
        self.index_pending = acc as u32;
        self.index_pending_bits = bits;
    }

    /// Completes the message: header, blocks moved down, CRC; then updates the compressor
    /// (controller, scale and Rice statistics). Returns the message's length and counts.
    ///
    /// Errors (nothing changed): [`Error::Incomplete`] before all elements were fed,
    /// [`Error::StreamClosed`] if already finished, [`Error::LengthMismatch`] for other
    /// buffers than at `begin`, [`Error::InvalidConfig`] if the message's fields were changed.
    pub fn finish(
        &mut self,
        c: &mut StreamCompressor,
        state: &[u8],
        out: &mut [u8],
    ) -> Result<StreamInfo, Error> {
        self.check(c, state, out)?;
        if self.fed != self.numel {
            return Err(Error::Incomplete);
        }
        let cfg = c.config;
        let reserve = cfg.header_reserve();
        let index_len = self.index_bytes as usize + (self.index_pending_bits > 0) as usize;
        let values_len = self.value_bytes as usize;
        let end = self.values_end();
        if reserve + index_len + values_len > end {
            return Err(Error::InvalidConfig); // unreachable after `check`
        }
        if self.index_pending_bits > 0 {
            if let Some(b) = out.get_mut(reserve + self.index_bytes as usize) {
                *b = self.index_pending as u8;
            }
        }
        let header = Header {
            numel: self.numel,
            nnz: self.nnz,
            quant: cfg.quant,
            index: IndexCoding::Rice {
                k: self.rice_k as u8,
            },
            scale: self.scale,
            stream: 0,
        };
        // The header is at most `reserve` bytes: it does not reach the index block.
        let header_len = header.write(out)?;
        let total = header_len + index_len + values_len + CHECKSUM_LEN;
        out.copy_within(reserve..reserve + index_len, header_len);
        out[end - values_len..end].reverse();
        out.copy_within(end - values_len..end, header_len + index_len);
        let crc = crc32c(&out[..total - CHECKSUM_LEN]);
        out[total - CHECKSUM_LEN..total].copy_from_slice(&crc.to_le_bytes());
        self.closed = true;

        c.messages += 1;
        c.last_selected = self.selected;
        if self.selected > 0 {
            c.last_max = self.max_selected;
        }
        if cfg.target != StreamTarget::Fixed {
            let ctl = &mut c.controller;
            if self.nnz > 0 {
                ctl.bits_per_entry = total as f32 * 8.0 / self.nnz as f32;
            }
            let ratio = self.selected as f32 / self.target.max(1) as f32;
            let factor = eighth_root(ratio).clamp(0.7, 1.4);
            ctl.threshold = (self.threshold * factor).max(f32::MIN_POSITIVE);
        }
        Ok(StreamInfo {
            bytes: total,
            nnz: self.nnz as usize,
            selected: self.selected as usize,
            threshold: self.threshold,
            scale: self.scale,
        })
    }
}

/// A message in progress that holds its compressor and buffers: [`StreamEncoder::feed`] the
/// chunks in order, then [`StreamEncoder::finish`].
#[derive(Debug)]
pub struct StreamEncoder<'a> {
    compressor: &'a mut StreamCompressor,
    state: &'a mut [u8],
    out: &'a mut [u8],
    message: StreamMessage,
}

impl StreamEncoder<'_> {
    /// Feeds the next chunk (see [`StreamMessage::feed`]).
    pub fn feed(&mut self, grad: &[f32]) -> Result<(), Error> {
        self.message
            .feed(self.compressor, self.state, self.out, grad)
    }

    /// Elements fed so far.
    pub fn fed(&self) -> usize {
        self.message.fed()
    }

    /// The message in progress.
    pub fn message(&self) -> &StreamMessage {
        &self.message
    }

    /// Completes the message (see [`StreamMessage::finish`]); its bytes are
    /// `out[..info.bytes]`.
    pub fn finish(mut self) -> Result<StreamInfo, Error> {
        self.message.finish(self.compressor, self.state, self.out)
    }
}

/// Whether `grad`, fed from element `start`, accumulates to finite values everywhere:
/// [`Error::NonFiniteGradient`] or [`Error::Overflow`] otherwise. Below 2^124 in magnitude
/// (bits < 0x7d80_0000) `g`, `r` and `u` cannot overflow (`|v| < 2^126` with either
/// momentum), so only larger ones pay for the accumulation here.
fn check_accumulation(
    cfg: &StreamConfig,
    r_buf: &[u8],
    u_buf: &[u8],
    start: usize,
    grad: &[f32],
) -> Result<(), Error> {
    let small = |x: f32| mag_bits(x) < 0x7d80_0000;
    for (j, &g) in grad.iter().enumerate() {
        if !is_finite_bits(g.to_bits()) {
            return Err(Error::NonFiniteGradient);
        }
        let i = start + j;
        let (r, u) = (cfg.state.load(r_buf, i), cfg.state.load(u_buf, i));
        if !(small(g) && small(r) && small(u)) {
            let (v, u) = accumulate_one(cfg.momentum, r, u, g);
            if !is_finite_bits(v.to_bits()) || !is_finite_bits(u.to_bits()) {
                return Err(Error::Overflow);
            }
        }
    }
    Ok(())
}

/// Stores `f(i, r, u) = (r', u')` for every element, block by block (int8 blocks are
/// quantised whole, as the encoder does).
fn rewrite(
    cfg: &StreamConfig,
    r_buf: &mut [u8],
    u_buf: &mut [u8],
    f: impl Fn(usize, f32, f32) -> (f32, f32),
) {
    let has_velocity = cfg.momentum.has_velocity();
    let (mut r_new, mut u_new) = ([0.0f32; StateFormat::BLOCK], [0.0f32; StateFormat::BLOCK]);
    let mut start = 0;
    while start < cfg.numel {
        let len = StateFormat::BLOCK.min(cfg.numel - start);
        for k in 0..len {
            let i = start + k;
            (r_new[k], u_new[k]) = f(i, cfg.state.load(r_buf, i), cfg.state.load(u_buf, i));
        }
        if cfg.state == StateFormat::Int8 {
            let b = start / StateFormat::BLOCK;
            StateFormat::store_block(r_buf, b, &r_new[..len]);
            if has_velocity {
                StateFormat::store_block(u_buf, b, &u_new[..len]);
            }
        } else {
            for k in 0..len {
                cfg.state.store(r_buf, start + k, r_new[k]);
                if has_velocity {
                    cfg.state.store(u_buf, start + k, u_new[k]);
                }
            }
        }
        start += len;
    }
}

/// The Rice parameter for `expected` entries of `numel` when `avail_bits` are free for the
/// index and value codes of `value_bits` each (module docs): `K = clamp(expected, 1,
/// avail_bits / (value_bits + 8))`; among the `k` for which one entry anywhere fits
/// (`(n >> k) + k + 1 + value_bits <= avail_bits`; all `k` if none does), the one minimising
/// `K·(k+1) + ((n − K) >> k)`, ties to the smaller.
fn rice_parameter(numel: u32, expected: u32, avail_bits: u64, value_bits: u32) -> u32 {
    let n = numel as u64;
    let vb = value_bits as u64;
    // A 32-bit division: a u64 one would link compiler-builtins' 64-bit divide on Cortex-M.
    let fit = avail_bits.min(u32::MAX as u64) as u32 / (value_bits + 8);
    let e = expected.min(fit).max(1) as u64;
    let fits = |k: u64| (n >> k) + k + 1 + vb <= avail_bits;
    let any_fits = fits(31);
    let mut best = (u64::MAX, 0);
    for k in 0..32u32 {
        let cost = e * (k as u64 + 1) + (n.saturating_sub(e) >> k);
        if cost < best.0 && (fits(k as u64) || !any_fits) {
            best = (cost, k);
        }
    }
    best.1
}

/// `max/levels`, never 0 for a non-zero `max`, and small enough that `levels·scale` is finite.
fn int_scale(max: f32, levels: f32) -> f32 {
    let mut s = (max / levels).max(f32::from_bits((max > 0.0) as u32));
    while s > 0.0 && !is_finite_bits((levels * s).to_bits()) {
        s = f32::from_bits(s.to_bits() - 1);
    }
    s
}

/// `round_half_away(x / scale)` clamped to `±levels` (0 for a zero scale).
#[inline]
fn quantize(x: f32, scale: f32, levels: i32) -> i32 {
    if scale > 0.0 {
        round_half_away(x / scale).clamp(-levels, levels)
    } else {
        0
    }
}

/// `x^(1/8)` by three square roots, for `x >= 0`.
fn eighth_root(x: f32) -> f32 {
    sqrt(sqrt(sqrt(x)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqrt_and_rice_parameter() {
        for &x in &[1.0f32, 2.0, 0.0576, 14.76, 1e-30, 1e30, 0.25, 12345.678] {
            let s = sqrt(x);
            assert!(((s * s - x) / x).abs() <= 4e-7, "{x}: {s}");
        }
        assert_eq!(eighth_root(256.0), 2.0);
        assert_eq!(sqrt(0.0), 0.0);
        // Dense: k = 0; 1 % density: k near log2(100 · ln 2) ≈ 6.
        let room = 1 << 40;
        assert_eq!(rice_parameter(1000, 1000, room, 8), 0);
        assert_eq!(rice_parameter(100_000, 1000, room, 8), 6);
        assert_eq!(rice_parameter(0, 0, room, 8), 0);
        assert!(rice_parameter(u32::MAX, 1, room, 8) <= 31);
        // A small buffer: fewer entries expected, and one entry anywhere must fit.
        assert_eq!(rice_parameter(1000, 1000, 47 * 8, 8), 5);
        assert!(rice_parameter(1000, 1000, 0, 8) <= 31); // nothing fits: any k
    }

    #[test]
    fn full_message_len_is_max_encoded_len() {
        for quant in [
            Quant::F32,
            Quant::F16,
            Quant::Bf16,
            Quant::Int8,
            Quant::Int4,
        ] {
            for n in [0usize, 1, 7, 8, 9, 1000, 12_345, u32::MAX as usize] {
                let c = StreamConfig {
                    quant,
                    ..StreamConfig::new(n, 1.0)
                };
                assert_eq!(c.full_message_len(), crate::max_encoded_len(n, quant));
            }
        }
    }

    #[test]
    fn int_scale_keeps_the_largest_code_finite() {
        assert_eq!(int_scale(0.0, 127.0), 0.0);
        assert!(int_scale(f32::from_bits(1), 127.0) > 0.0);
        let s = int_scale(f32::MAX, 127.0);
        assert!((127.0 * s).is_finite());
        assert_eq!(quantize(1.0, 0.0, 127), 0);
        assert_eq!(quantize(1e30, 1e-30, 127), 127);
        assert_eq!(quantize(-1e30, 1e-30, 7), -7);
    }
}
