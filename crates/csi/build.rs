//! Generates the CSI v1.10.0 gRPC services and messages from `proto/csi.proto`
//! (the specification's file, unchanged) with tonic + prost. Needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    Ok(())
}
