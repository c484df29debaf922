//! `iotcompress._iotcompress`: the thin PyO3 layer over `iotcompress-core`.
//!
//! It only converts types, releases the GIL around the core's work and maps errors; the
//! argument checking with friendly messages and the documentation live in the Python
//! package (`python/iotcompress/`), which is the public face.

use iotcompress_core::{
    decode_add as core_decode_add, parse, Config, Error, IndexCoding, Momentum, NetworkProfile,
    OwnedCompressor, Quant, Selection, StateFormat, StreamCompressor, StreamConfig, StreamInfo,
    StreamMessage, StreamTarget, Target, ThresholdController,
};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use std::sync::Mutex;

mod novelty;

/// The one place core errors become Python exceptions: malformed messages raise
/// `iotcompress.DecodeError`, everything else `iotcompress.CompressError`; both are
/// `ValueError`s.
fn to_py(py: Python<'_>, e: Error) -> PyErr {
    let name = if e.is_decode_error() {
        "DecodeError"
    } else {
        "CompressError"
    };
    library_error(py, name, e.message())
}

/// An instance of `iotcompress.errors.<name>` (a `ValueError` if that cannot be made).
fn library_error(py: Python<'_>, name: &str, reason: &str) -> PyErr {
    match py
        .import("iotcompress.errors")
        .and_then(|m| m.getattr(name))
        .and_then(|c| c.call1((reason,)))
    {
        Ok(exception) => PyErr::from_value(exception),
        Err(_) => PyValueError::new_err(reason.to_owned()),
    }
}

fn selection(
    density: Option<f64>,
    threshold: Option<f32>,
    target_bytes: Option<u32>,
    adaptive: bool,
    exact: bool,
) -> PyResult<Selection> {
    Ok(match (density, threshold, target_bytes, adaptive) {
        (None, None, None, false) => Selection::Dense,
        (Some(d), None, None, false) => Selection::TopK { density: d, exact },
        (Some(d), None, None, true) => Selection::Adaptive(Target::Density(d)),
        (None, Some(t), None, false) => Selection::Threshold(t),
        (None, None, Some(b), _) => Selection::Adaptive(Target::Bytes(b)),
        _ => return Err(PyValueError::new_err("conflicting selection options")),
    })
}

/// `(residual, velocity, (step, threshold, bits_per_entry))`.
type Snapshot<'py> = (
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<f32>>,
    (u64, f32, f32),
);

/// The core compressor with its owned state and a reused output buffer.
struct Inner {
    core: OwnedCompressor,
    out: Vec<u8>,
    last_nnz: usize,
    /// The in-place path reads the gradient twice (check, then accumulation): it works on
    /// this private copy, so another thread writing the array meanwhile cannot poison the
    /// state. The double-buffered path reads it once and checks what it read.
    grad: Vec<f32>,
}

/// A frozen class around a mutex: calls from several threads (the GIL is released while
/// the core works) take turns, and property reads wait for a running compress instead of
/// failing with "already mutably borrowed".
#[pyclass(module = "iotcompress._iotcompress", name = "Compressor", frozen)]
struct PyCompressor {
    inner: Mutex<Inner>,
}

impl PyCompressor {
    /// Runs `f` on the locked state, waiting for the lock without the GIL (the holder may
    /// need it to finish).
    fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Inner) -> T + Send) -> T {
        py.detach(|| {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut inner)
        })
    }
}

fn contiguous<'a>(a: &'a PyReadonlyArray1<'_, f32>, name: &str) -> PyResult<&'a [f32]> {
    a.as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be contiguous")))
}

#[pymethods]
impl PyCompressor {
    #[new]
    #[pyo3(signature = (numel, density, threshold, target_bytes, adaptive, exact, quant, momentum, nesterov, seed, low_memory=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        numel: usize,
        density: Option<f64>,
        threshold: Option<f32>,
        target_bytes: Option<u32>,
        adaptive: bool,
        exact: bool,
        quant: &str,
        momentum: f32,
        nesterov: bool,
        seed: u64,
        low_memory: bool,
    ) -> PyResult<Self> {
        let quant =
            Quant::from_name(quant).ok_or_else(|| PyValueError::new_err("unknown quantiser"))?;
        let config = Config {
            selection: selection(density, threshold, target_bytes, adaptive, exact)?,
            quant,
            momentum: Momentum::new(momentum, nesterov),
            seed,
        };
        let mut core = OwnedCompressor::new(config, numel).map_err(|e| to_py(py, e))?;
        if low_memory {
            core.set_double_buffering(false);
        }
        let out = vec![0u8; core.max_message_len()];
        Ok(PyCompressor {
            inner: Mutex::new(Inner {
                core,
                out,
                last_nnz: 0,
                grad: Vec::new(),
            }),
        })
    }

    /// Compresses a contiguous float32 vector; the GIL is released meanwhile.
    fn compress<'py>(
        &self,
        py: Python<'py>,
        grad: PyReadonlyArray1<'py, f32>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let grad = contiguous(&grad, "gradient")?;
        let msg = self.with(py, |s| {
            let grad = private(&mut s.grad, !s.core.double_buffering(), grad);
            let info = s.core.compress(grad, &mut s.out)?;
            s.last_nnz = info.nnz;
            Ok(s.out[..info.bytes].to_vec())
        });
        Ok(PyBytes::new(py, &msg.map_err(|e| to_py(py, e))?))
    }

    /// Adds a contiguous float32 vector into the residual without sending; the GIL is
    /// released meanwhile.
    fn accumulate(&self, py: Python<'_>, grad: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let grad = contiguous(&grad, "gradient")?;
        self.with(py, |s| {
            let grad = private(&mut s.grad, !s.core.double_buffering(), grad);
            s.core.accumulate(grad)
        })
        .map_err(|e| to_py(py, e))
    }

    /// Puts the last message back (`msg=None`, bit-exact) or adds `msg` back.
    #[pyo3(signature = (msg=None))]
    fn restore(&self, py: Python<'_>, msg: Option<&[u8]>) -> PyResult<()> {
        self.with(py, |s| match msg {
            None => s.core.restore(),
            Some(m) => s.core.restore_message(m),
        })
        .map_err(|e| to_py(py, e))
    }

    /// Whether `restore()` has a message to put back.
    #[getter]
    fn can_restore(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.core.can_restore())
    }

    /// Switches to another selection, keeping the state.
    #[pyo3(signature = (density, threshold, target_bytes, adaptive, exact))]
    fn set_selection(
        &self,
        py: Python<'_>,
        density: Option<f64>,
        threshold: Option<f32>,
        target_bytes: Option<u32>,
        adaptive: bool,
        exact: bool,
    ) -> PyResult<()> {
        let sel = selection(density, threshold, target_bytes, adaptive, exact)?;
        self.with(py, |s| s.core.set_selection(sel))
            .map_err(|e| to_py(py, e))
    }

    /// Threads for the passes over the whole tensor (messages do not depend on it).
    #[getter]
    fn threads(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.core.core().threads())
    }

    #[setter]
    fn set_threads(&self, py: Python<'_>, threads: usize) {
        self.with(py, |s| s.core.set_threads(threads));
    }

    /// Whether the state is double-buffered (a spare residual and velocity).
    #[getter]
    fn double_buffered(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.core.double_buffering())
    }

    /// Turns double buffering on (a spare is allocated) or off, keeping the state.
    #[setter]
    fn set_double_buffered(&self, py: Python<'_>, on: bool) {
        self.with(py, |s| {
            if s.core.double_buffering() != on {
                s.core.set_double_buffering(on);
            }
        });
    }

    /// Whether compress keeps the undo record `restore()` needs.
    #[getter]
    fn restorable(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.core.recording())
    }

    /// Turns the undo record of `restore()` on or off (off drops the current one).
    #[setter]
    fn set_restorable(&self, py: Python<'_>, on: bool) {
        self.with(py, |s| s.core.set_recording(on));
    }

    /// Takes the last compress or accumulate back whole (double-buffered only).
    fn revert(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| s.core.revert()).map_err(|e| to_py(py, e))
    }

    /// Whether `revert()` can take back the last call.
    #[getter]
    fn can_revert(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.core.can_revert())
    }

    /// A copy: the owned buffers are swapped with their spares after each message, so no
    /// view of them is ever handed out.
    #[getter]
    fn residual<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        PyArray1::from_vec(py, self.with(py, |s| s.core.residual().to_vec()))
    }

    #[getter]
    fn velocity<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        let v = self.with(py, |s| {
            let c = &s.core;
            if c.velocity().is_empty() {
                vec![0.0; c.residual().len()]
            } else {
                c.velocity().to_vec()
            }
        });
        PyArray1::from_vec(py, v)
    }

    /// Sum of squares of the residual (f64), without copying it.
    #[getter]
    fn residual_sq_norm(&self, py: Python<'_>) -> f64 {
        self.with(py, |s| {
            s.core.residual().iter().map(|&x| x as f64 * x as f64).sum()
        })
    }

    #[getter]
    fn has_velocity(&self, py: Python<'_>) -> bool {
        self.with(py, |s| !s.core.velocity().is_empty())
    }

    #[getter]
    fn step(&self, py: Python<'_>) -> u64 {
        self.with(py, |s| s.core.core().step)
    }

    #[getter]
    fn threshold(&self, py: Python<'_>) -> f32 {
        self.with(py, |s| s.core.core().controller.threshold)
    }

    #[getter]
    fn last_nnz(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.last_nnz)
    }

    #[getter]
    fn max_message_len(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.core.max_message_len())
    }

    /// `(step, threshold, bits_per_entry)`: the scalar state.
    fn counters(&self, py: Python<'_>) -> (u64, f32, f32) {
        self.with(py, |s| {
            let c = s.core.core();
            (c.step, c.controller.threshold, c.controller.bits_per_entry)
        })
    }

    /// `(residual, velocity, (step, threshold, bits_per_entry))`, read in one turn.
    fn snapshot<'py>(&self, py: Python<'py>) -> Snapshot<'py> {
        let (r, u, counters) = self.with(py, |s| {
            let c = &s.core;
            let u = if c.velocity().is_empty() {
                vec![0.0; c.residual().len()]
            } else {
                c.velocity().to_vec()
            };
            let k = c.core();
            let counters = (k.step, k.controller.threshold, k.controller.bits_per_entry);
            (c.residual().to_vec(), u, counters)
        });
        (
            PyArray1::from_vec(py, r),
            PyArray1::from_vec(py, u),
            counters,
        )
    }

    /// Replaces the whole state and the selection in one turn, after checking everything
    /// (lengths, finiteness, the controller); on error nothing changed.
    #[pyo3(signature = (residual, velocity, counters, density, threshold, target_bytes, adaptive, exact))]
    #[allow(clippy::too_many_arguments)]
    fn load_state(
        &self,
        py: Python<'_>,
        residual: PyReadonlyArray1<'_, f32>,
        velocity: PyReadonlyArray1<'_, f32>,
        counters: (u64, f32, f32),
        density: Option<f64>,
        threshold: Option<f32>,
        target_bytes: Option<u32>,
        adaptive: bool,
        exact: bool,
    ) -> PyResult<()> {
        let r = contiguous(&residual, "residual")?;
        let v = contiguous(&velocity, "velocity")?;
        let sel = selection(density, threshold, target_bytes, adaptive, exact)?;
        let controller = ThresholdController {
            threshold: counters.1,
            bits_per_entry: counters.2,
        };
        let checked = self.with(py, |s| {
            let c = &mut s.core;
            let n = c.residual().len();
            if r.len() != n {
                return Err("residual has the wrong length");
            }
            if !c.velocity().is_empty() && v.len() != n {
                return Err("velocity has the wrong length");
            }
            if !r.iter().chain(v).all(|x| x.is_finite()) {
                return Err("residual and velocity must be finite");
            }
            if !controller.is_valid() {
                return Err("threshold and bits_per_entry must be finite and >= 0");
            }
            // Validated first: the only step left that can fail leaves the state as it is.
            c.set_selection(sel).map_err(|e| e.message())?;
            c.residual_mut().copy_from_slice(r);
            if !c.velocity().is_empty() {
                c.velocity_mut().copy_from_slice(v);
            }
            let core = c.core_mut();
            core.step = counters.0;
            core.controller = controller;
            Ok(())
        });
        checked.map_err(PyValueError::new_err)
    }
}

/// The gradient a call reads: `grad` itself where the core reads it once (double
/// buffering), else a private copy in `copy` (see [`Inner::grad`]).
fn private<'a>(copy: &'a mut Vec<f32>, in_place: bool, grad: &'a [f32]) -> &'a [f32] {
    if !in_place {
        return grad;
    }
    copy.clear();
    copy.extend_from_slice(grad);
    copy
}

/// The streaming encoder with its owned state and output buffers, and what takes a message
/// back (the host has the memory a device does not).
struct Stream {
    inner: StreamCompressor,
    state: Vec<u8>,
    out: Vec<u8>,
    message: Option<StreamMessage>,
    last: StreamInfo,
    /// `restore()`: the last finished message's state from before it and its gradient.
    undo: Option<Taken>,
    /// `abort()`: the open message's state from before `begin` and the chunks fed so far.
    open: Option<Taken>,
}

/// The compressor, last info and state from before a message, and the gradient fed to it.
struct Taken {
    inner: StreamCompressor,
    last: StreamInfo,
    state: Vec<u8>,
    fed: Vec<f32>,
}

impl Stream {
    fn taken(&self) -> Taken {
        Taken {
            inner: self.inner,
            last: self.last,
            state: self.state.clone(),
            fed: Vec::new(),
        }
    }
}

/// Frozen around a mutex, like `Compressor`: calls from several threads take turns and
/// property reads see the state before or after a call, never half of it.
#[pyclass(
    module = "iotcompress._iotcompress",
    name = "StreamingCompressor",
    frozen
)]
struct PyStreaming {
    inner: Mutex<Stream>,
}

impl PyStreaming {
    fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Stream) -> T + Send) -> T {
        py.detach(|| {
            let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut inner)
        })
    }
}

#[pymethods]
impl PyStreaming {
    #[new]
    #[pyo3(signature = (numel, threshold, target_count, target_bytes, quant, state, momentum, nesterov, capacity))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        numel: usize,
        threshold: f32,
        target_count: Option<u32>,
        target_bytes: Option<u32>,
        quant: &str,
        state: &str,
        momentum: f32,
        nesterov: bool,
        capacity: Option<usize>,
    ) -> PyResult<Self> {
        let quant =
            Quant::from_name(quant).ok_or_else(|| PyValueError::new_err("unknown quantiser"))?;
        let state = match state {
            "f32" => StateFormat::F32,
            "f16" => StateFormat::F16,
            "bf16" => StateFormat::Bf16,
            "int8" => StateFormat::Int8,
            _ => return Err(PyValueError::new_err("unknown state format")),
        };
        let target = match (target_count, target_bytes) {
            (None, None) => StreamTarget::Fixed,
            (Some(c), None) => StreamTarget::Count(c),
            (None, Some(b)) => StreamTarget::Bytes(b),
            _ => return Err(PyValueError::new_err("conflicting targets")),
        };
        let config = StreamConfig {
            numel,
            threshold,
            target,
            quant,
            momentum: Momentum::new(momentum, nesterov),
            state,
        };
        let inner = StreamCompressor::new(config).map_err(|e| to_py(py, e))?;
        let cap = capacity.unwrap_or(config.full_message_len());
        Ok(PyStreaming {
            inner: Mutex::new(Stream {
                inner,
                state: vec![0; config.state_len()],
                out: vec![0; cap],
                message: None,
                last: StreamInfo::default(),
                undo: None,
                open: None,
            }),
        })
    }

    /// Starts a message; the face refuses while one is open.
    fn begin(&self, py: Python<'_>) -> PyResult<()> {
        self.with(py, |s| {
            let m = s.inner.begin(&s.state, &s.out)?;
            s.open = Some(s.taken());
            s.message = Some(m);
            Ok(())
        })
        .map_err(|e| to_py(py, e))
    }

    /// Feeds the next chunk of the open message; the GIL is released meanwhile. An error
    /// changes nothing.
    fn feed(&self, py: Python<'_>, chunk: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let chunk = contiguous(&chunk, "chunk")?;
        self.with(py, |s| {
            let (Some(m), Some(open)) = (s.message.as_mut(), s.open.as_mut()) else {
                return Err(Error::StreamClosed);
            };
            // A private copy: what is checked is what is stored and kept for `restore`.
            let at = open.fed.len();
            open.fed.extend_from_slice(chunk);
            let r = m.feed(&s.inner, &mut s.state, &mut s.out, &open.fed[at..]);
            if r.is_err() {
                open.fed.truncate(at);
            }
            r
        })
        .map_err(|e| to_py(py, e))
    }

    /// Completes the open message and returns its bytes.
    fn finish<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let msg = self.with(py, |s| {
            let m = s.message.as_mut().ok_or(Error::StreamClosed)?;
            let info = m.finish(&mut s.inner, &s.state, &mut s.out)?;
            s.message = None;
            s.last = info;
            s.undo = s.open.take();
            Ok(s.out[..info.bytes].to_vec())
        });
        Ok(PyBytes::new(py, &msg.map_err(|e| to_py(py, e))?))
    }

    /// One message from `grad` fed in pieces of `chunks` lengths: all or nothing (any error
    /// puts the state and counters back as before the call).
    fn compress<'py>(
        &self,
        py: Python<'py>,
        grad: PyReadonlyArray1<'py, f32>,
        chunks: Vec<usize>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let grad = contiguous(&grad, "grad")?;
        let msg = self.with(py, |s| {
            if s.message.is_some() {
                return Err(Error::StreamClosed);
            }
            let mut saved = s.taken();
            // A private copy: what is checked is what is stored and kept for `restore`.
            saved.fed = grad.to_vec();
            let grad = &saved.fed;
            let mut run = || -> Result<StreamInfo, Error> {
                let mut m = s.inner.begin(&s.state, &s.out)?;
                let mut at = 0;
                for &len in &chunks {
                    let end = at + len.min(grad.len() - at);
                    m.feed(&s.inner, &mut s.state, &mut s.out, &grad[at..end])?;
                    at = end;
                }
                m.finish(&mut s.inner, &s.state, &mut s.out)
            };
            match run() {
                Ok(info) => {
                    s.last = info;
                    s.undo = Some(saved);
                    Ok(s.out[..info.bytes].to_vec())
                }
                Err(e) => {
                    // Every byte back, the last message's undo record included.
                    (s.inner, s.last, s.state) = (saved.inner, saved.last, saved.state);
                    Err(e)
                }
            }
        });
        Ok(PyBytes::new(py, &msg.map_err(|e| to_py(py, e))?))
    }

    /// Adds a whole gradient into the state without sending (all or nothing).
    fn accumulate(&self, py: Python<'_>, grad: PyReadonlyArray1<'_, f32>) -> PyResult<()> {
        let grad = contiguous(&grad, "grad")?;
        self.with(py, |s| {
            if s.message.is_some() {
                return Err(Error::StreamClosed);
            }
            // A private copy: the check and the update read the same values.
            let grad = grad.to_vec();
            s.inner.accumulate(&mut s.state, &grad)?;
            s.undo = None;
            Ok(())
        })
        .map_err(|e| to_py(py, e))
    }

    /// Takes back the open message: the state and counters as before `begin`.
    fn abort(&self, py: Python<'_>) -> bool {
        self.with(py, |s| match s.open.take() {
            Some(t) => {
                (s.inner, s.last, s.state) = (t.inner, t.last, t.state);
                s.message = None;
                true
            }
            None => false,
        })
    }

    /// Puts the last finished message back (`msg=None`): the state as if its gradient had
    /// been accumulated without sending, the counters as before it; or adds `msg` back.
    #[pyo3(signature = (msg=None))]
    fn restore(&self, py: Python<'_>, msg: Option<&[u8]>) -> PyResult<()> {
        self.with(py, |s| {
            if s.message.is_some() {
                return Err(Error::StreamClosed);
            }
            match msg {
                Some(m) => {
                    s.inner.restore_message(&mut s.state, m)?;
                    s.undo = None;
                    Ok(())
                }
                None => {
                    let Some(t) = s.undo.as_mut() else {
                        return Err(Error::NothingToRestore);
                    };
                    // From the state before the message: cannot fail (its feeds did not).
                    t.inner.accumulate(&mut t.state, &t.fed)?;
                    let t = s.undo.take().ok_or(Error::NothingToRestore)?;
                    (s.inner, s.last, s.state) = (t.inner, t.last, t.state);
                    Ok(())
                }
            }
        })
        .map_err(|e| to_py(py, e))
    }

    /// Whether `restore()` has a finished message to put back.
    #[getter]
    fn can_restore(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.message.is_none() && s.undo.is_some())
    }

    /// Whether a message is open.
    #[getter]
    fn is_open(&self, py: Python<'_>) -> bool {
        self.with(py, |s| s.message.is_some())
    }

    /// `(state bytes, (messages, threshold, bits_per_entry, last_max, last_selected))`.
    fn get_state<'py>(&self, py: Python<'py>) -> (Bound<'py, PyBytes>, (u64, f32, f32, f32, u32)) {
        let (bytes, c) = self.with(py, |s| {
            let i = s.inner;
            (
                s.state.clone(),
                (
                    i.messages,
                    i.controller.threshold,
                    i.controller.bits_per_entry,
                    i.last_max,
                    i.last_selected,
                ),
            )
        });
        (PyBytes::new(py, &bytes), c)
    }

    /// Replaces the state and counters, after checking all of them (length, every stored
    /// value finite, counters in range); drops an open message and the undo record.
    fn load_state(
        &self,
        py: Python<'_>,
        state: &[u8],
        counters: (u64, f32, f32, f32, u32),
    ) -> PyResult<()> {
        let state = state.to_vec();
        let checked = self.with(py, move |s| {
            let n = s.inner.config().numel;
            if state.len() != s.state.len() {
                return Err("state has the wrong length");
            }
            let c = &s.inner;
            let finite = (0..n).all(|i| {
                c.residual_at(&state, i).is_finite() && c.velocity_at(&state, i).is_finite()
            });
            if !finite {
                return Err("state holds NaN or infinity");
            }
            let (messages, threshold, bpe, last_max, last_selected) = counters;
            let controller = ThresholdController {
                threshold,
                bits_per_entry: bpe,
            };
            if !controller.is_valid() {
                return Err("threshold and bits_per_entry must be finite and >= 0");
            }
            if !(last_max.is_finite() && last_max >= 0.0) {
                return Err("last_max must be finite and >= 0");
            }
            if last_selected as usize > n {
                return Err("last_selected exceeds numel");
            }
            s.state = state;
            s.inner.controller = controller;
            (s.inner.messages, s.inner.last_max, s.inner.last_selected) =
                (messages, last_max, last_selected);
            s.message = None;
            s.undo = None;
            s.open = None;
            Ok(())
        });
        checked.map_err(PyValueError::new_err)
    }

    /// Elements fed to the open message (0 when none is open).
    #[getter]
    fn fed(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.message.map_or(0, |m| m.fed()))
    }

    /// The stored residual, as float32.
    #[getter]
    fn residual<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        let v = self.with(py, |s| {
            let n = s.inner.config().numel;
            (0..n)
                .map(|i| s.inner.residual_at(&s.state, i))
                .collect::<Vec<f32>>()
        });
        PyArray1::from_vec(py, v)
    }

    /// The stored velocity, as float32 (zeros without momentum).
    #[getter]
    fn velocity<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        let v = self.with(py, |s| {
            let n = s.inner.config().numel;
            (0..n)
                .map(|i| s.inner.velocity_at(&s.state, i))
                .collect::<Vec<f32>>()
        });
        PyArray1::from_vec(py, v)
    }

    /// The raw state buffer (residual, then velocity, in the configured format).
    #[getter]
    fn state_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let b = self.with(py, |s| s.state.clone());
        PyBytes::new(py, &b)
    }

    /// The threshold the next message uses.
    #[getter]
    fn threshold(&self, py: Python<'_>) -> f32 {
        self.with(py, |s| s.inner.threshold())
    }

    #[getter]
    fn messages(&self, py: Python<'_>) -> u64 {
        self.with(py, |s| s.inner.messages)
    }

    /// `(bytes, nnz, selected, threshold, scale)` of the last finished message.
    fn last_info(&self, py: Python<'_>) -> (usize, usize, usize, f32, f32) {
        let i = self.with(py, |s| s.last);
        (i.bytes, i.nnz, i.selected, i.threshold, i.scale)
    }

    #[getter]
    fn capacity(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.out.len())
    }

    #[getter]
    fn state_len(&self, py: Python<'_>) -> usize {
        self.with(py, |s| s.state.len())
    }
}

/// `out += scale * message`, all or nothing; the GIL is released meanwhile. A buffer that
/// another call is writing right now is refused with `iotcompress.BusyError`.
#[pyfunction]
fn decode_add(
    py: Python<'_>,
    msg: &[u8],
    out: &Bound<'_, PyArray1<f32>>,
    scale: f32,
) -> PyResult<()> {
    let mut out = out.try_readwrite().map_err(|_| busy(py))?;
    let out = out
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be contiguous"))?;
    py.detach(|| core_decode_add(msg, out, scale).map(|_| ()))
        .map_err(|e| to_py(py, e))
}

/// `iotcompress.BusyError`: the buffer is being written by another call.
fn busy(py: Python<'_>) -> PyErr {
    let reason = "out is being written by another call right now: decode_add calls into one \
                  buffer from several threads must take turns";
    library_error(py, "BusyError", reason)
}

/// A new dense float32 array of the message's element count (at most `max_numel`; equal
/// to `numel` when given).
#[pyfunction]
#[pyo3(signature = (msg, numel, max_numel))]
fn decode<'py>(
    py: Python<'py>,
    msg: &[u8],
    numel: Option<usize>,
    max_numel: usize,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let m = parse(msg, max_numel).map_err(|e| to_py(py, e))?;
    let n = m.header.numel as usize;
    if numel.is_some_and(|want| want != n) {
        return Err(to_py(py, Error::NumelMismatch));
    }
    let out = PyArray1::<f32>::zeros(py, n, false);
    {
        let mut view = out.readwrite();
        let slice = view
            .as_slice_mut()
            .map_err(|_| PyValueError::new_err("internal: new array not contiguous"))?;
        py.detach(|| core_decode_add(msg, slice, 1.0).map(|_| ()))
            .map_err(|e| to_py(py, e))?;
    }
    Ok(out)
}

/// The header fields and block sizes of a message verified as fully as `decode` does
/// (framing, checksum, and every index and value code), without allocating for it.
#[pyfunction]
fn inspect<'py>(py: Python<'py>, msg: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let m = parse(msg, usize::MAX).map_err(|e| to_py(py, e))?;
    py.detach(|| iotcompress_core::wire::for_each_entry(&m, |_, _| {}))
        .map_err(|e| to_py(py, e))?;
    let h = m.header;
    let d = PyDict::new(py);
    d.set_item("version", iotcompress_core::wire::VERSION)?;
    d.set_item("numel", h.numel)?;
    d.set_item("nnz", h.nnz)?;
    d.set_item("quant", h.quant.name())?;
    d.set_item("levels", h.quant.levels())?;
    d.set_item("index", h.index.name())?;
    d.set_item(
        "rice_k",
        if let IndexCoding::Rice { k } = h.index {
            Some(k)
        } else {
            None
        },
    )?;
    d.set_item("scale", h.scale)?;
    d.set_item("stream", h.stream)?;
    d.set_item(
        "header_bytes",
        m.len - m.index_len() - m.values_len() - iotcompress_core::wire::CHECKSUM_LEN,
    )?;
    d.set_item("index_bytes", m.index_len())?;
    d.set_item("value_bytes", m.values_len())?;
    d.set_item("nbytes", m.len)?;
    Ok(d)
}

/// The kernel family in use: `"avx2"` or `"scalar"`.
#[pyfunction]
fn simd_level() -> &'static str {
    iotcompress_core::kernels::Level::active().name()
}

/// Turns SIMD kernels on or off for the process (output is identical; only speed changes).
#[pyfunction]
fn set_simd(enabled: bool) {
    iotcompress_core::kernels::set_simd(enabled)
}

/// `(bytes of the largest message)` for `numel` elements with quantiser `quant`.
#[pyfunction]
fn max_encoded_len(numel: usize, quant: &str) -> PyResult<usize> {
    let q = Quant::from_name(quant).ok_or_else(|| PyValueError::new_err("unknown quantiser"))?;
    Ok(iotcompress_core::max_encoded_len(numel, q))
}

/// `T_c` in microseconds of one exchange of `nbytes` on a link of `latency_us` and
/// `bandwidth_bps` (see `iotcompress_core::NetworkProfile`).
#[pyfunction]
fn network_comm_time_us(latency_us: u64, bandwidth_bps: u64, nbytes: u64) -> u64 {
    NetworkProfile::new(latency_us, bandwidth_bps).comm_time_us(nbytes)
}

/// The most bytes one exchange carries within `budget_us` on that link.
#[pyfunction]
fn network_bytes_within(latency_us: u64, bandwidth_bps: u64, budget_us: u64) -> u64 {
    NetworkProfile::new(latency_us, bandwidth_bps).bytes_within(budget_us)
}

/// The named presets: `[(name, latency_us, bandwidth_bps)]`.
#[pyfunction]
fn network_presets() -> Vec<(&'static str, u64, u64)> {
    NetworkProfile::PRESETS
        .iter()
        .map(|&(name, p)| (name, p.latency_us, p.bandwidth_bps))
        .collect()
}

/// An upper bound on the bytes of a message carrying `nnz` of `numel` elements, wherever
/// they lie (`iotcompress_core::wire::message_len_bound`).
#[pyfunction]
fn message_len_bound(numel: usize, nnz: usize, quant: &str) -> PyResult<usize> {
    let q = Quant::from_name(quant).ok_or_else(|| PyValueError::new_err("unknown quantiser"))?;
    Ok(iotcompress_core::wire::message_len_bound(numel, nnz, q))
}

#[pymodule]
fn _iotcompress(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyCompressor>()?;
    m.add_class::<PyStreaming>()?;
    m.add_class::<novelty::PyNovelty>()?;
    m.add_function(wrap_pyfunction!(decode_add, m)?)?;
    m.add_function(wrap_pyfunction!(decode, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(max_encoded_len, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(set_simd, m)?)?;
    m.add_function(wrap_pyfunction!(network_comm_time_us, m)?)?;
    m.add_function(wrap_pyfunction!(network_bytes_within, m)?)?;
    m.add_function(wrap_pyfunction!(network_presets, m)?)?;
    m.add_function(wrap_pyfunction!(message_len_bound, m)?)?;
    m.add("WIRE_VERSION", iotcompress_core::wire::VERSION)?;
    Ok(())
}
