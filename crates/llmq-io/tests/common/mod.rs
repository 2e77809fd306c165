#![allow(dead_code)]
use llmq_core::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh empty directory under the system temp dir.
pub fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "llmq-io-test-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Asserts `r` is an `Error::File` about `path` whose message contains every one of `needles`.
pub fn assert_file_err<T: std::fmt::Debug>(r: Result<T, Error>, path: &Path, needles: &[&str]) -> String {
    match r {
        Err(Error::File { path: p, msg }) => {
            assert_eq!(p, path, "error names the wrong file: {msg}");
            for n in needles {
                assert!(msg.contains(n), "message {msg:?} lacks {n:?}");
            }
            msg
        }
        other => panic!("expected Error::File about {}, got {other:?}", path.display()),
    }
}

/// Asserts the error (any variant) displays with every one of `needles`.
pub fn assert_err_contains<T: std::fmt::Debug>(r: Result<T, Error>, needles: &[&str]) -> String {
    match r {
        Err(e) => {
            let s = e.to_string();
            for n in needles {
                assert!(s.contains(n), "message {s:?} lacks {n:?}");
            }
            s
        }
        Ok(v) => panic!("expected an error containing {needles:?}, got Ok({v:?})"),
    }
}
