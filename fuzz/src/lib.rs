//! The fuzz targets' checks (src/checks.rs, shared with tests/fuzz_corpus.rs).
pub mod checks;
