//! Parquet inputs of `llmq tokenize`: one document (or conversation) per row, in a top-level
//! column named by `--field`.
//!
//! Only that column is read, one row group at a time (a row group's pages are decoded as its rows
//! are visited), so memory does not grow with the file. Snappy, zstd and uncompressed files are
//! read; other codecs are an error naming the file. A text column is a UTF-8 string (`BYTE_ARRAY`
//! annotated as a string, or plain bytes that are valid UTF-8); a conversation column is a list of
//! structs with `role` and `content`, read as the same JSON a JSONL line would hold.

use crate::guarded;
use llmq_core::{Error, Result};
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::Field;
use parquet::schema::types::Type;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One column of a Parquet file, opened for reading row group by row group.
pub struct ParquetColumn {
    path: PathBuf,
    reader: SerializedFileReader<File>,
    /// The file's schema cut to the one column.
    projection: Type,
}

impl ParquetColumn {
    pub fn open(path: &Path, field: &str) -> Result<ParquetColumn> {
        let f = File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        let reader = guarded(|| SerializedFileReader::new(f)).map_err(|e| Error::file(path, format!("not a readable Parquet file: {e}")))?;
        let schema = reader.metadata().file_metadata().schema();
        let col = schema.get_fields().iter().find(|t| t.name() == field).ok_or_else(|| {
            let names: Vec<&str> = schema.get_fields().iter().map(|t| t.name()).collect();
            Error::file(path, format!("no column `{field}` (columns: {})", names.join(", ")))
        })?;
        let projection = Type::group_type_builder(schema.name())
            .with_fields(vec![Arc::clone(col)])
            .build()
            .map_err(|e| Error::file(path, format!("cannot select column `{field}`: {e}")))?;
        Ok(ParquetColumn { path: path.to_path_buf(), reader, projection })
    }

    pub fn row_groups(&self) -> usize {
        self.reader.metadata().num_row_groups()
    }

    /// The compressed bytes of row group `i` (for progress).
    pub fn row_group_bytes(&self, i: usize) -> u64 {
        self.reader.metadata().row_group(i).compressed_size().max(0) as u64
    }

    /// Calls `f(row, value)` for each row of row group `i`; `row` counts from 0 over the file
    /// and `first_row` is the index of the group's first row.
    pub fn read_row_group(
        &self,
        i: usize,
        first_row: u64,
        f: &mut dyn FnMut(u64, serde_json::Value) -> Result<()>,
    ) -> Result<u64> {
        let err = |row: Option<u64>, e: &dyn std::fmt::Display| {
            let at = row.map(|r| format!("row {r}")).unwrap_or_else(|| format!("row group {i}"));
            Error::file(&self.path, format!("{at}: cannot read: {e}"))
        };
        let rg = guarded(|| self.reader.get_row_group(i)).map_err(|e| err(None, &e))?;
        let mut rows = guarded(|| rg.get_row_iter(Some(self.projection.clone()))).map_err(|e| err(None, &e))?;
        let mut n = 0u64;
        loop {
            let row = first_row + n;
            let Some(r) = guarded(|| rows.next().transpose()).map_err(|e| err(Some(row), &e))? else { break };
            let v = match r.get_column_iter().next() {
                Some((_, Field::Str(s))) => serde_json::Value::String(s.clone()),
                Some((_, Field::Bytes(b))) => match std::str::from_utf8(b.data()) {
                    Ok(s) => serde_json::Value::String(s.to_string()),
                    Err(e) => return Err(err(Some(row), &format!("bytes that are not UTF-8 text ({e})"))),
                },
                Some((_, other)) => other.to_json_value(),
                None => serde_json::Value::Null,
            };
            f(row, v)?;
            n += 1;
        }
        Ok(n)
    }
}
