//! SIGINT/SIGTERM: the first one asks the loop to finish the current step, write a checkpoint
//! and exit 0; a second one exits at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub fn install() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let res = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            eprintln!("second signal: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("signal: finishing the current step, then checkpoint and exit (again to abort)");
    });
    if let Err(e) = res {
        eprintln!("warning: cannot install the signal handler: {e}");
    }
    flag
}
