//! Graph capture on the CPU reference (`llmq_core::capture`): a capture's code runs once per key
//! and later calls replay its recorded ops on the current device contents, with the host values
//! they were recorded with; the rules of a CUDA stream capture are enforced with messages.

use llmq_core::cpu::CpuBackend;
use llmq_core::dtype::DType;
use llmq_core::observe::{Call, Observed, Observer};
use llmq_core::stream_check::StreamChecked;
use llmq_core::{Backend, GraphKey, MemCategory, Mem, Stream, Tensor};
use std::cell::Cell;

fn f32s(be: &dyn Backend, t: &Tensor) -> Vec<f32> {
    be.download(t).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn put(be: &dyn Backend, t: &Tensor, v: &[f32]) {
    be.upload(t, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>()).unwrap();
}

fn vec3(be: &mut dyn Backend) -> Tensor {
    be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[3]).unwrap()
}

#[test]
fn code_runs_once_per_key_and_replays_read_the_current_inputs() {
    let mut be = CpuBackend::new();
    let (x, y, w, rstd) = (vec3(&mut be), vec3(&mut be), vec3(&mut be), be.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap());
    put(&be, &w, &[1.0, 1.0, 1.0]);
    let runs = Cell::new(0);
    let mut eps = 0.0f32;
    let norm = |be: &CpuBackend, eps: f32| {
        be.capture(GraphKey::new("norm", 0), &mut |b| {
            runs.set(runs.get() + 1);
            b.rmsnorm_fwd(&y, &rstd, &x, &w, eps, None)
        })
    };
    put(&be, &x, &[3.0, 0.0, 4.0]);
    norm(&be, eps).unwrap();
    let first = f32s(&be, &y);
    // a replay reads the new input...
    put(&be, &x, &[0.0, 6.0, 8.0]);
    eps = 100.0; // ...but not the new host value: it was recorded with eps = 0
    norm(&be, eps).unwrap();
    let replayed = f32s(&be, &y);
    assert_eq!(runs.get(), 1, "the capture's code ran again");
    assert_eq!(be.graphs_recorded(), 1);
    let mut fresh = CpuBackend::new();
    let (fx, fy, fw, fr) = (vec3(&mut fresh), vec3(&mut fresh), vec3(&mut fresh), fresh.alloc(MemCategory::Other, Mem::Device, DType::F32, &[1]).unwrap());
    put(&fresh, &fw, &[1.0, 1.0, 1.0]);
    put(&fresh, &fx, &[0.0, 6.0, 8.0]);
    fresh.rmsnorm_fwd(&fy, &fr, &fx, &fw, 0.0, None).unwrap();
    assert_eq!(replayed, f32s(&fresh, &fy), "the replay did not use the current input with the recorded eps");
    assert_ne!(first, replayed);
    // another key runs its own code
    be.capture(GraphKey::new("norm", 1), &mut |b| {
        runs.set(runs.get() + 1);
        b.zero(&y, Stream::Compute)
    })
    .unwrap();
    assert_eq!((runs.get(), be.graphs_recorded()), (2, 2));
    assert_eq!(f32s(&be, &y), [0.0; 3]);
}

/// Code for a capture over two tensors.
type Case = dyn FnMut(&dyn Backend, &[Tensor; 2]) -> llmq_core::Result<()>;

fn capture_err(f: &mut Case) -> String {
    let mut be = CpuBackend::new();
    let ts = [vec3(&mut be), vec3(&mut be)];
    let ev = be.create_event().unwrap();
    be.record(ev, Stream::Copy).unwrap();
    be.capture(GraphKey::new("t", 0), &mut |b| f(b, &ts)).unwrap_err().to_string()
}

#[test]
fn captures_refuse_what_a_stream_capture_cannot_hold() {
    let cases: Vec<(&str, Box<Case>)> = vec![
        ("a download inside a capture", Box::new(|b, t| b.download(&t[0]).map(|_| ()))),
        ("a synchronous upload inside a capture", Box::new(|b, t| b.upload(&t[0], &[0; 12]))),
        ("a synchronize inside a capture", Box::new(|b, _| b.synchronize())),
        ("the copy stream, which has not joined", Box::new(|b, t| b.copy(&t[0], &t[1], Stream::Copy))),
        ("waits for event 0 recorded outside the capture", Box::new(|b, _| b.wait(Stream::Compute, llmq_core::Event(0)))),
        ("ends on the side stream", Box::new(|b, _| b.set_stream(Stream::Side))),
        ("inside a capture", Box::new(|b, _| b.capture(GraphKey::new("inner", 0), &mut |_| Ok(())))),
        (
            "work on the side stream is not joined back",
            Box::new(|b, t| {
                b.record(llmq_core::Event(0), Stream::Compute)?;
                b.wait(Stream::Side, llmq_core::Event(0))?;
                b.set_stream(Stream::Side)?;
                b.zero(&t[0], Stream::Side)?;
                b.set_stream(Stream::Compute)
            }),
        ),
    ];
    for (want, mut f) in cases {
        let e = capture_err(&mut *f);
        assert!(e.contains(want) && e.contains("graph capture t 0"), "expected {want:?}, got {e}");
    }
}

#[test]
fn forked_and_joined_streams_are_captured() {
    let mut be = CpuBackend::new();
    let (x, y) = (vec3(&mut be), vec3(&mut be));
    let (fork, join) = (be.create_event().unwrap(), be.create_event().unwrap());
    for _ in 0..2 {
        put(&be, &x, &[1.0, 2.0, 3.0]);
        be.capture(GraphKey::new("fork", 0), &mut |b| {
            b.record(fork, Stream::Compute)?;
            b.wait(Stream::Copy, fork)?;
            b.copy(&y, &x, Stream::Copy)?;
            b.record(join, Stream::Copy)?;
            b.wait(Stream::Compute, join)
        })
        .unwrap();
        assert_eq!(f32s(&be, &y), [1.0, 2.0, 3.0]);
        put(&be, &y, &[0.0; 3]);
    }
}

struct Count(Cell<usize>);
impl Observer for Count {
    fn name(&self) -> &'static str {
        "count"
    }
    fn after(&self, _: &dyn Backend, call: &Call) -> llmq_core::Result<()> {
        if call.op == "zero" || call.op == "convert" {
            self.0.set(self.0.get() + 1);
        }
        Ok(())
    }
}

#[test]
fn observers_see_every_replayed_op() {
    let mut be = Observed::wrap(Box::new(CpuBackend::new()), Count(Cell::new(0)));
    let (x, y) = (vec3(&mut be), vec3(&mut be));
    for _ in 0..3 {
        be.capture(GraphKey::new("obs", 0), &mut |b| {
            b.zero(&x, Stream::Compute)?;
            b.convert(&y, &x)
        })
        .unwrap();
    }
    assert_eq!(be.observer.0.get(), 6);
    // and the stream-order checker checks them
    let mut sc = StreamChecked::new(Box::new(CpuBackend::new()));
    let x = vec3(&mut sc);
    let before = sc.ops_checked();
    for _ in 0..2 {
        sc.capture(GraphKey::new("obs", 0), &mut |b| b.zero(&x, Stream::Compute)).unwrap();
    }
    assert_eq!(sc.ops_checked() - before, 2);
}
