use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument to an op (shape, dtype): a bug in the caller, reported instead of UB.
    #[error("op error: {0}")]
    Op(String),
    /// Bad user configuration (command line, config.json).
    #[error("configuration error: {0}")]
    Config(String),
    /// A file that cannot be used, with the path and what is wrong.
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("backend error: {0}")]
    Backend(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::File { path: path.into(), msg: msg.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
