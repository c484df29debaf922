//! # iotcompress-core
//!
//! Gradient compression for distributed training over slow links, from GPU servers down to
//! Cortex-M microcontrollers: `#![no_std]`, no dependencies, no heap on the compress and
//! decode paths, and the same bytes on every platform.
//!
//! The pipeline ("two-step deep compression"):
//!
//! 1. [`feedback`]: add the gradient into a residual (error feedback), optionally with DGC
//!    momentum correction;
//! 2. [`select`]: pick the entries to send (threshold `Wt`, exact or sampled top-k, dense);
//! 3. [`quant`]: quantise their values;
//! 4. [`wire`]: encode them in wire format v1 (`docs/wire-format.md`) — and on the other side
//!    [`decode_add`] them into a dense buffer.
//!
//! [`stream`] does the same for a gradient that arrives in chunks (threshold selection, the
//! message written as the chunks come, optionally a compact f16/bf16/int8 residual): the path
//! for microcontrollers that cannot hold the whole gradient.
//!
//! ```
//! use iotcompress_core::{Buffers, Compressor, Config, Quant, Selection, decode_add};
//!
//! let n = 1000;
//! let config = Config { quant: Quant::Int8, ..Config::new(Selection::TopK { density: 0.01, exact: true }) };
//! let mut c = Compressor::new(config, n).unwrap();
//! let (mut residual, mut scratch) = (vec![0.0f32; n], vec![0u32; c.scratch_len()]);
//! let mut msg = vec![0u8; c.max_message_len()];
//! let grad: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
//! let bufs = Buffers { residual: &mut residual, velocity: &mut [], scratch: &mut scratch, spare: None };
//! let info = c.compress(bufs, &grad, &mut msg).unwrap();
//! assert_eq!(info.nnz, 10);
//!
//! let mut sum = vec![0.0f32; n];
//! decode_add(&msg[..info.bytes], &mut sum, 1.0).unwrap();
//! ```
#![cfg_attr(not(any(test, feature = "std")), no_std)]
// `unsafe` lives only in the SIMD kernels (`kernels/x86_64.rs`, `kernels/aarch64.rs`) and in
// the huge-page advice (`pages.rs`), each block with its SAFETY.
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

mod compress;
mod error;
pub mod feedback;
mod float;
#[doc(hidden)]
pub mod kernels;
pub mod network;
pub mod novelty;
#[cfg(feature = "alloc")]
mod owned;
#[cfg(feature = "alloc")]
mod pages;
pub mod quant;
pub mod rng;
pub mod select;
pub mod stream;
pub mod wire;

pub use compress::{Buffers, Compressor, Config, Spare, StepInfo};
pub use error::Error;
pub use feedback::Momentum;
pub use float::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
pub use network::NetworkProfile;
pub use novelty::{Metric, NoveltyConfig, NoveltyFilter};
#[cfg(feature = "alloc")]
pub use owned::{decode_to_vec, OwnedCompressor, DOUBLE_BUFFER_MIN};
pub use quant::Quant;
pub use select::{k_for_density, Selection, Target, ThresholdController};
pub use stream::{
    StateFormat, StreamCompressor, StreamConfig, StreamEncoder, StreamInfo, StreamMessage,
    StreamTarget,
};
pub use wire::{decode_add, max_encoded_len, parse, Header, IndexCoding, Message};
