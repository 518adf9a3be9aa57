//! Micro-benchmarks of Torus's hot paths live in `benches/hot_paths.rs`:
//! `cargo bench -p torus-microbench`. Not part of the test suite.
