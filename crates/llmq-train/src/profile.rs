//! An observer (`llmq_core::observe`) that times every op (synchronising before and after it), for a per-op time
//! breakdown of a training step (`llmq train --profile`). Synchronising serialises the streams
//! and adds launch gaps, so the total is above the real step time; the shares are what matter.

use llmq_core::observe::{Call, Observed, Observer};
use llmq_core::{Backend, Matmul, Result};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

/// op label -> (calls, seconds)
type Times = Rc<RefCell<BTreeMap<String, (u64, f64)>>>;

/// The observer that times each call (see the module comment).
pub struct Timer {
    times: Times,
    start: Cell<Option<Instant>>,
}

/// A backend whose calls are timed.
pub type Profiled = Observed<Timer>;

/// Reads the times of a `Profiled` backend owned elsewhere (e.g. by a trainer).
#[derive(Clone)]
pub struct ProfileHandle(Times);

impl ProfileHandle {
    /// (label, calls, seconds), largest first; clears the table.
    pub fn take(&self) -> Vec<(String, u64, f64)> {
        let mut v: Vec<_> = std::mem::take(&mut *self.0.borrow_mut()).into_iter().map(|(k, (n, s))| (k, n, s)).collect();
        v.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap());
        v
    }
}

/// `inner` with every call timed, and the handle that reads the times.
pub fn profiled(inner: Box<dyn Backend>) -> (Profiled, ProfileHandle) {
    let times = Times::default();
    (Observed::wrap(inner, Timer { times: times.clone(), start: Cell::new(None) }), ProfileHandle(times))
}

fn mm_label(a: &Matmul) -> String {
    let (m, n, k) = a.dims().unwrap_or((0, 0, 0));
    format!(
        "matmul {}{}x{} {}x{}x{}{}",
        a.a.dtype,
        if a.trans_a { "ᵀ" } else { "" },
        if a.trans_b { "ᵀ" } else { "" },
        m,
        n,
        k,
        if a.accumulate { " +=" } else { "" }
    )
}

fn label(call: &Call) -> String {
    match (call.op, call.matmul) {
        (_, Some(mm)) => mm_label(mm),
        ("convert", _) => match (call.reads[0], call.writes[0]) {
            (Some(src), Some(dst)) => format!("convert {}->{}", src.dtype, dst.dtype),
            _ => "convert".into(),
        },
        (op, _) => op.into(),
    }
}

impl Observer for Timer {
    fn name(&self) -> &'static str {
        "profiled"
    }
    fn before(&self, inner: &dyn Backend, call: &Call) -> Result<()> {
        if call.op != "synchronize" {
            inner.synchronize()?;
            self.start.set(Some(Instant::now()));
        }
        Ok(())
    }
    fn after(&self, inner: &dyn Backend, call: &Call) -> Result<()> {
        let Some(t0) = self.start.take() else { return Ok(()) };
        inner.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        let mut m = self.times.borrow_mut();
        let e = m.entry(label(call)).or_insert((0, 0.0));
        e.0 += 1;
        e.1 += dt;
        Ok(())
    }
}
