//! Compiles `proto/` with protox (no system `protoc` needed) and generates tonic code: the public API
//! (`nsml.v1`, what clients generate from) and the platform's internal calls (`nsml.internal.v1`).

use std::path::{Path, PathBuf};

fn protos(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    Ok(files)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let public = protos(&root.join("nsml/v1"))?;
    let internal = protos(&root.join("nsml/internal/v1"))?;
    for f in public.iter().chain(&internal) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let compile = |files: &[PathBuf]| -> Result<protox::Compiler, Box<dyn std::error::Error>> {
        let mut compiler = protox::Compiler::new([&root])?;
        compiler
            .include_source_info(true)
            .include_imports(true)
            .open_files(files)?;
        Ok(compiler)
    };
    let all: Vec<PathBuf> = public.iter().chain(&internal).cloned().collect();
    let compiler = compile(&all)?;
    let fds = compiler.file_descriptor_set();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let pool = compiler.descriptor_pool();
    std::fs::write(out.join("internal_methods.rs"), internal_methods(&pool))?;
    std::fs::write(out.join("type_names.rs"), type_names(&pool))?;
    std::fs::write(
        out.join("nsml_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    std::fs::write(
        out.join("nsml_public_descriptor.bin"),
        prost::Message::encode_to_vec(&compile(&public)?.file_descriptor_set()),
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
        .extern_path(".nsml.internal.v1", "crate::internal::v1")
        .out_dir(&clients)
        .compile_fds(fds)?;
    Ok(())
}

/// The gRPC paths of every method of `nsml.internal.v1`, as a Rust constant.
fn internal_methods(pool: &prost_reflect::DescriptorPool) -> String {
    let mut paths: Vec<String> = pool
        .services()
        .filter(|s| s.package_name() == "nsml.internal.v1")
        .flat_map(|s| {
            s.methods()
                .map(|m| format!("/{}/{}", s.full_name(), m.name()))
                .collect::<Vec<_>>()
        })
        .collect();
    paths.sort();
    let mut code = String::from(
        "/// Every method of `nsml.internal.v1`: only the platform's services and runners call them, on the\n\
         /// services' internal ports; the gateway routes none of them.\npub const INTERNAL_METHODS: &[&str] = &[\n",
    );
    for path in paths {
        code.push_str(&format!("    {path:?},\n"));
    }
    code.push_str("];\n");
    code
}

/// `prost::Name` for every message of `nsml.v1`, so that a message can be found in the descriptor by its type.
fn type_names(pool: &prost_reflect::DescriptorPool) -> String {
    let mut code = String::new();
    for message in pool.all_messages() {
        if message.package_name() != "nsml.v1" || message.parent_message().is_some() {
            continue;
        }
        code.push_str(&format!(
            "impl ::prost::Name for {name} {{\n    const NAME: &'static str = {name:?};\n    const PACKAGE: &'static str = \"nsml.v1\";\n}}\n",
            name = message.name()
        ));
    }
    code
}
