//! The novelty filter (`iotcompress_core::novelty`) for `iotcompress.data`: the filter with
//! its bank owned here; checks with reasons live in the Python package.

use iotcompress_core::novelty::{bank_len, Metric, NoveltyConfig, NoveltyFilter};
use iotcompress_core::Error;
use numpy::{PyArray1, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::{PyMemoryError, PyValueError};
use pyo3::prelude::*;

use crate::to_py;

/// A novelty filter and its bank.
#[pyclass(module = "iotcompress._iotcompress", name = "Novelty")]
pub(crate) struct PyNovelty {
    filter: NoveltyFilter,
    bank: Vec<f32>,
}

#[pymethods]
impl PyNovelty {
    #[new]
    #[pyo3(signature = (dim, channels, pool, capacity, metric, threshold, keep, rate))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        dim: u32,
        channels: u32,
        pool: u32,
        capacity: u32,
        metric: &str,
        threshold: f32,
        keep: f32,
        rate: f32,
    ) -> PyResult<Self> {
        let metric = [Metric::Euclidean, Metric::Cosine]
            .into_iter()
            .find(|m| m.name() == metric)
            .ok_or_else(|| PyValueError::new_err("unknown metric"))?;
        let config = NoveltyConfig {
            dim,
            channels,
            pool,
            capacity,
            metric,
            threshold,
            keep,
            rate,
        };
        let filter = NoveltyFilter::new(config).map_err(|e| to_py(py, e))?;
        let len = bank_len(&config).ok_or_else(|| to_py(py, Error::InvalidConfig))?;
        let mut bank = Vec::new();
        bank.try_reserve_exact(len)
            .map_err(|_| PyMemoryError::new_err("novelty bank too large"))?;
        bank.resize(len, 0.0);
        Ok(PyNovelty { filter, bank })
    }

    /// Offers one contiguous float32 sample: True to keep it.
    fn offer(&mut self, py: Python<'_>, sample: PyReadonlyArray1<'_, f32>) -> PyResult<bool> {
        let sample = sample
            .as_slice()
            .map_err(|_| PyValueError::new_err("sample must be contiguous"))?;
        self.filter
            .offer(&mut self.bank, sample)
            .map_err(|e| to_py(py, e))
    }

    /// Offers the rows of a C-contiguous (n, dim) float32 array in order; the keep mask.
    /// All or nothing: a non-finite value anywhere fails before any row is offered. The GIL
    /// is released meanwhile.
    fn offer_many<'py>(
        &mut self,
        py: Python<'py>,
        samples: PyReadonlyArray2<'py, f32>,
    ) -> PyResult<Bound<'py, PyArray1<bool>>> {
        let dim = samples.shape()[1];
        let flat = samples
            .as_slice()
            .map_err(|_| PyValueError::new_err("samples must be C-contiguous"))?;
        let (filter, bank) = (&mut self.filter, &mut self.bank);
        let keep = py
            .detach(|| -> Result<Vec<bool>, Error> {
                if dim != filter.config().dim as usize {
                    return Err(Error::LengthMismatch);
                }
                if !flat.iter().all(|v| v.is_finite()) {
                    return Err(Error::NonFiniteGradient);
                }
                flat.chunks_exact(dim.max(1))
                    .map(|s| filter.offer(bank, s))
                    .collect()
            })
            .map_err(|e| to_py(py, e))?;
        Ok(PyArray1::from_vec(py, keep))
    }

    /// The current threshold (a distance).
    #[getter]
    fn threshold(&self) -> f32 {
        self.filter.threshold()
    }

    /// Samples offered so far.
    #[getter]
    fn seen(&self) -> u64 {
        self.filter.seen()
    }

    /// Samples kept so far.
    #[getter]
    fn kept(&self) -> u64 {
        self.filter.kept()
    }

    /// Views remembered now.
    #[getter]
    fn stored(&self) -> u32 {
        self.filter.ring().1
    }

    /// Floats of the bank (the filter's memory besides this small struct).
    #[getter]
    fn bank_len(&self) -> usize {
        self.bank.len()
    }
}
