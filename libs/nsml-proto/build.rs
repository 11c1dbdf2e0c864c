//! Compiles `proto/` with protox (no system `protoc` needed) and generates tonic code.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("nsml/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("nsml_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Servers decode requests with the crate's own codec (an undecodable request is INVALID_ARGUMENT);
    // clients keep tonic's. The clients are generated apart, over the messages generated with the servers.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .codec_path("crate::codec::RequestCodec")
        .compile_fds(fds.clone())?;
    let clients = out.join("clients");
    std::fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .extern_path(".nsml.v1", "crate::v1")
        .out_dir(&clients)
        .compile_fds(fds)?;
    Ok(())
}
