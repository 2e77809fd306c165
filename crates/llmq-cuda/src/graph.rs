//! CUDA graphs for `Backend::capture`.
//!
//! Per key, the first call runs the capture's code eagerly, through `llmq_core::capture::Recorder`
//! (which checks what a stream capture allows): work that happens on first use only (cuBLASLt's
//! algorithm tuning, which synchronises) happens there, outside any capture. The second call
//! captures the code on the compute stream (thread-local mode: other threads' CUDA calls are
//! not affected), instantiates the graph and launches it; later calls only launch it. The graph
//! holds the same kernels, algorithms, operands and scalars as the eager call, so it gives the
//! same bits.
//!
//! Pitfalls: a capture records the ops without running them, so the captured call must launch
//! the graph too; a failure inside the capture must still end it (else the stream stays in
//! capture mode) and discard the partial graph.

use crate::device::check;
use crate::CudaBackend;
use cudarc::driver::sys;
use llmq_core::capture::{CaptureFn, GraphKey, Recorder};
use llmq_core::{Error, Result, Stream};

/// An instantiated graph.
pub(crate) struct Graph {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles were created by `capture_graph` and are destroyed once, while the
        // backend's context is alive (graphs are dropped before it).
        unsafe {
            sys::cuGraphExecDestroy(self.exec);
            sys::cuGraphDestroy(self.graph);
        }
    }
}

/// What the backend knows of a key.
pub(crate) enum GraphState {
    /// Ran eagerly once; captured on the next call.
    Warm,
    Ready(Graph),
}

impl CudaBackend {
    pub(crate) fn capture_op(&self, key: GraphKey, f: &mut CaptureFn) -> Result<()> {
        self.dev.bind()?;
        if self.cur.get() != Stream::Compute {
            return Err(Error::Op(format!("graph capture {key}: starts on the {} stream; captures start on the compute stream", self.cur.get().name())));
        }
        let stream = self.dev.stream(Stream::Compute);
        if let Some(GraphState::Ready(g)) = self.graphs.borrow().get(&key) {
            // SAFETY: a live graph of this context, launched on its compute stream.
            return check(unsafe { sys::cuGraphLaunch(g.exec, stream) }, "cuGraphLaunch");
        }
        let warm = self.graphs.borrow().contains_key(&key);
        if !warm {
            Recorder::run(self, key, f)?;
            self.graphs.borrow_mut().insert(key, GraphState::Warm);
            return Ok(());
        }
        let g = self.capture_graph(key, stream, f)?;
        // SAFETY: as above.
        check(unsafe { sys::cuGraphLaunch(g.exec, stream) }, "cuGraphLaunch")?;
        self.graphs.borrow_mut().insert(key, GraphState::Ready(g));
        Ok(())
    }

    fn capture_graph(&self, key: GraphKey, stream: sys::CUstream, f: &mut CaptureFn) -> Result<Graph> {
        // SAFETY: the compute stream of this context, not capturing (captures do not nest:
        // `Recorder` refuses a capture inside one).
        check(unsafe { sys::cuStreamBeginCapture_v2(stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) }, "cuStreamBeginCapture")?;
        let issued = Recorder::run(self, key, f);
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: ends the capture begun above (also after a failure, so the stream leaves
        // capture mode); `graph` receives the captured graph or null.
        let ended = check(unsafe { sys::cuStreamEndCapture(stream, &mut graph) }, "cuStreamEndCapture");
        if let Err(e) = issued.and(ended) {
            if !graph.is_null() {
                // SAFETY: the partial graph of the failed capture, destroyed once.
                unsafe { sys::cuGraphDestroy(graph) };
            }
            return Err(Error::Op(format!("graph capture {key}: {e}")));
        }
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: `graph` is the valid graph the capture produced.
        if let Err(e) = check(unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }, "cuGraphInstantiate") {
            // SAFETY: as above, destroyed once.
            unsafe { sys::cuGraphDestroy(graph) };
            return Err(e);
        }
        Ok(Graph { graph, exec })
    }
}
